// ortlora's artifacts from Node.js with the plain onnxruntime-node package (no Python, no training build).
//
//   node ortlora_client.mjs train-step ARTIFACTS REQUEST.json   loss + LoRA gradients (portable training graph)
//   node ortlora_client.mjs logits MODEL.onnx REQUEST.json      logits of an inference model (e.g. ortlora-export --to onnx)
//
// REQUEST.json: {"input_ids": [[...]], "attention_mask": [[...]], "labels": [[...]],
//                "weights": {"NAME": {"shape": [...], "data": [...]}}}   (labels and weights: train-step only)
// Prints one JSON object: {"loss": x, "grads": {"NAME": {"shape": [...], "data": [...]}}} or {"logits": {...}}.
// An app that trains adds its optimizer between steps (AdamW is a few lines: see ortlora/runtime/optim.py).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';

const int64 = (rows) => new ort.Tensor('int64', BigInt64Array.from(rows.flat(), BigInt), [rows.length, rows[0].length]);
const float32 = ({ shape, data }) => new ort.Tensor('float32', Float32Array.from(data), shape);
const plain = (tensor) => ({ shape: tensor.dims, data: Array.from(tensor.data) });

async function trainStep(artifacts, request) {
  const manifest = JSON.parse(readFileSync(join(artifacts, 'ortlora.json'), 'utf8'));
  const session = await ort.InferenceSession.create(join(artifacts, manifest.files.portable_training_model));
  const feeds = { input_ids: int64(request.input_ids), attention_mask: int64(request.attention_mask), labels: int64(request.labels) };
  for (const p of manifest.parameters) feeds[p.onnx_name] = float32(request.weights[p.onnx_name]);
  const out = await session.run(feeds);
  const grads = {};
  for (const p of manifest.parameters) grads[p.onnx_name] = plain(out[`${p.onnx_name}_grad`]);
  return { loss: out.loss.data[0], grads, onnxruntime: ort.env.versions.node };
}

async function logits(model, request) {
  const session = await ort.InferenceSession.create(model);
  const out = await session.run({ input_ids: int64(request.input_ids), attention_mask: int64(request.attention_mask) });
  return { logits: plain(out.logits), onnxruntime: ort.env.versions.node };
}

const [command, path, requestFile] = process.argv.slice(2);
const commands = { 'train-step': trainStep, logits };
if (!commands[command] || !path || !requestFile) {
  console.error('usage: node ortlora_client.mjs train-step ARTIFACTS REQUEST.json | logits MODEL.onnx REQUEST.json');
  process.exit(2);
}
const result = await commands[command](path, JSON.parse(readFileSync(requestFile, 'utf8')));
process.stdout.write(JSON.stringify(result) + '\n');
