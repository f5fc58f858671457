"""Chat templates, rendered as transformers renders them, at a bounded cost.

A chat template is a program that comes with the model's files. It renders in jinja's immutable sandbox with
what transformers' chat-template environment adds, and within a budget of operations and characters that
grows with the conversation (``Budget``): a template that loops for minutes or doubles a string until memory
runs out is stopped in one line (``TemplateTooCostly``) instead. tokenizer.py renders through it.
"""

from __future__ import annotations

import functools
import json
import re
import string

from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from ortlora.errors import OrtloraError


class TemplateTooCostly(OrtloraError):
    """The chat template exceeded its budget of operations or text on one conversation: the template's fault (a
    loop that never ends, text that doubles), so the run stops rather than skipping every line."""


# What one rendering of the chat template may cost, relative to the size of what it renders (the characters of
# the messages and tools as JSON). Qwen2.5's template, tools and tool calls included, takes about 0.25 operations
# per character (14 per message, a message being at least ~30 characters, plus an operation per 16 characters
# of the strings it makes) and writes 1 to 1.9 characters per character (its system prompt of tools included), so
# 4 operations and 8 characters leave it a margin of 4 to 16 times, and the bases cover any fixed preamble. An
# operation costs at most ~5 microseconds (a macro call, on this project's 2-core machine), so the base allows
# about a second, and a conversation of N characters ~20 N microseconds more; no rendering makes more than 16
# characters of strings per operation.
TEMPLATE_BASE_OPERATIONS = 200_000  # each call, filter, test, lookup, operator and loop item; scans by size
TEMPLATE_OPERATIONS_PER_CHAR = 4
TEMPLATE_BASE_CHARS = 1 << 20  # 1 MiB of output (and of any one string or list made on the way)
TEMPLATE_CHARS_PER_CHAR = 8
TEMPLATE_MAX_INT_BITS = 1 << 16  # a number of up to ~19,700 digits: enough for arithmetic, not for 9 ** 9 ** 9
TEMPLATE_MAX_JSON_INDENT = 16


def conversation_size(value) -> int:
    """The size of what a template renders: the characters of its JSON."""
    return len(json.dumps(value, ensure_ascii=False, default=str))


_SIZED = (str, list, tuple, dict, set)


class Budget:
    """The operations and characters one rendering may still spend."""

    def __init__(self, source: str, size: int):
        self.source = source
        self.max_operations = TEMPLATE_BASE_OPERATIONS + TEMPLATE_OPERATIONS_PER_CHAR * size
        self.max_chars = TEMPLATE_BASE_CHARS + TEMPLATE_CHARS_PER_CHAR * size
        self.operations = 0
        self.chars = 0

    def charge(self, operations: int = 1) -> None:
        self.operations += operations
        if self.operations > self.max_operations:
            raise TemplateTooCostly(
                f"the chat template of {self.source} took more than {self.max_operations:,} operations rendering one "
                f"conversation (a template may take {TEMPLATE_BASE_OPERATIONS:,} plus {TEMPLATE_OPERATIONS_PER_CHAR} "
                "per character of the conversation); use a chat template without loops that run that long")

    def too_large(self, what: str, size: int) -> TemplateTooCostly:
        return TemplateTooCostly(
            f"the chat template of {self.source} made a value of {size:,} characters or items ({what}) rendering one "
            f"conversation, more than the {self.max_chars:,} allowed ({TEMPLATE_BASE_CHARS:,} plus "
            f"{TEMPLATE_CHARS_PER_CHAR} per character of the conversation)")

    def check_size(self, what: str, size: int) -> None:
        if size > self.max_chars:
            raise self.too_large(what, size)

    def write(self, chars: int) -> None:
        """Text written, where it goes: the rendering, or a {% set %} block, macro or {% filter %} that captures it."""
        if chars >= 64:
            self.charge(chars >> 6)
        self.chars += chars
        self.check_size("text written", self.chars)


def environment():
    """jinja's immutable sandbox with what transformers' chat-template environment adds
    (transformers.utils.chat_template_utils._cached_compile_jinja_template): the loop controls, its
    ``tojson`` (no key sorting, no HTML escaping, non-ASCII kept: jinja's own filter would turn
    {"zcity": "Zürich", "a<b": 1} into {"a\\u003cb": 1, "zcity": "Z\\u00fcrich"}), ``raise_exception``,
    ``strftime_now``, ``dict`` and a ``namespace`` that refuses underscored names. Not its ``{% generation %}``
    tag, which only marks assistant text for transformers' own masks."""
    from datetime import datetime

    import jinja2.ext
    from jinja2.exceptions import SecurityError, TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:  # dict(...) without the class itself, so no attribute leads out of the sandbox
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    class TemplateNamespace(Namespace):
        def __init__(*args, **kwargs):  # Namespace's own signature trick, so that namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check_name(name)
            Namespace.__setitem__(self, name, value)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    env.globals.pop("lipsum", None)  # lipsum(100000) writes 60 MB of Latin: no chat template needs it
    env.filters = {name: env.bounded(f, name) for name, f in env.filters.items()}
    env.filters[_LOOP_FILTER] = env.loop_items
    env.filters[_CONCAT_FILTER] = jinja2.pass_eval_context(lambda context, values: env.tilde(values, context.autoescape))
    env.filters[_SCANNED_FILTER] = env.scanned
    env.filters[_WRITTEN_FILTER] = jinja2.pass_context(lambda context, value: env.written(value))  # with the
    # context, jinja cannot evaluate it once when compiling (for constant text), unbudgeted
    env.tests = {name: env.bounded_test(f) for name, f in env.tests.items()}
    return env


_PRINTF_SIZES = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")  # %-10.3f: width, precision
# Filters that do not walk their value: messages | length or messages | last inside a loop over the messages
# costs one operation, not one per message.
_CONSTANT_TIME_FILTERS = {"length", "count", "first", "last", "default", "d", "attr", "int", "float", "abs", "round",
                          "random", "items"}
# Filters that make a string of their value (str() of a list first, where it is one).
_STRINGIFYING_FILTERS = {"string", "pprint", "tojson", "trim", "escape", "e", "forceescape", "safe", "upper", "lower",
                         "capitalize", "title", "center", "indent", "wordwrap", "truncate", "replace", "urlize",
                         "striptags", "wordcount", "format", "urlencode", "xmlattr"}
_WIDTH_FILTERS = {"center", "wordwrap", "truncate", "batch", "slice"}  # their int arguments are sizes
_STR_METHODS_OF_SIZE = {"center", "ljust", "rjust", "zfill"}


def _largest(numbers) -> int:
    return max((int(n) for n in numbers if n and n.isdigit()), default=0)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox in which one rendering has a budget (a ``Budget``, set as ``budget`` while a
    template renders): every call, filter, test, attribute and item lookup, operator and loop item costs one
    operation, a filter one more per item or character of its value, and every value made, compared or sliced
    one per 16 characters or items; no string or list, nor all the text written, may grow past the budget's
    characters. Sizes are checked before a value is made wherever they can be known first ('x' * n,
    s.center(n), s | replace('', s), '%*d' % (n, 1), '%s%s' % (s, s), parts | join, a ~ b, str() of a list,
    9 ** 9 ** 9) and after the steps that at most double one (+, a call), so no single step makes much more
    than the budget allows; jinja's own ``range`` still stops at 100,000 items, and nested loops pay per item."""

    intercepted_binops = frozenset(["+", "*", "%", "**"])  # the ones that can make a value much larger

    def __init__(self, *args, **kwargs):
        super().__init__(*args, optimized=False, **kwargs)  # optimized folds constants when compiling, unbudgeted
        self.budget: Budget | None = None

    # --- what each step costs

    def _charge(self, operations: int = 1) -> None:
        budget = self.budget
        if budget is not None:
            budget.charge(operations)

    def checked(self, value, what: str = "a value"):
        budget = self.budget
        if budget is None:
            return value
        if isinstance(value, (str, list, tuple, dict, set)):
            budget.check_size(what, len(value))
        elif isinstance(value, int) and value.bit_length() > TEMPLATE_MAX_INT_BITS:
            raise self._too_big_number()
        return value

    def _too_big_number(self) -> TemplateTooCostly:
        source = self.budget.source if self.budget is not None else "this tokenizer"
        return TemplateTooCostly(f"the chat template of {source} made a number of more than "
                                 f"{TEMPLATE_MAX_INT_BITS:,} bits rendering one conversation")

    def _refuse_size(self, what: str, size: int) -> None:
        if self.budget is not None:
            self.budget.check_size(what, size)
        elif size > TEMPLATE_BASE_CHARS:
            raise TemplateTooCostly(f"the chat template makes a value of {size:,} characters or items ({what})")

    def written(self, value):
        """``value``, written by {{ ... }} or as the template's own text: it counts against the budget's characters
        (a list or dict by what it would write, before it is written)."""
        if self.budget is not None:
            self.budget.write(len(value) if type(value) is str else self.text_size(value))
        return value

    def tilde(self, values, autoescape: bool = False):
        """a ~ b ~ c, as jinja joins it (escaping what is not markup inside {% autoescape true %}), its size
        checked before it is made."""
        from jinja2.runtime import markup_join, str_join

        self._refuse_size("a string joined with '~'", sum(self.text_size(v) for v in values))
        return self.scanned((markup_join if autoescape else str_join)(values))

    def loop_items(self, iterable):
        """Each item of a for loop costs one operation."""
        for item in iterable:
            self._charge()
            yield item

    # --- the sandbox's hooks

    def getattr(self, obj, attribute):
        self._charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._charge()
        return super().getitem(obj, argument)

    def scanned(self, value):
        """``value`` after charging for a step that makes, copies or compares it at C speed: 16 characters or
        items an operation (a string made, compared, sliced, searched). So no more text than 16 characters per
        operation of the budget is ever made: a map(...) | list of 100 KB strings pays for each."""
        if isinstance(value, _SIZED) and len(value) >= 16 and self.budget is not None:
            self.budget.charge(len(value) >> 4)
        return value

    def text_size(self, value) -> int:
        """About how many characters str(value) would have, found without making it: a string's length (plus its
        quotes and comma in a list), 32 for a number or other object, a container's items; the walk stops once
        past what the budget allows, and costs an operation per 16 items."""
        limit = self.budget.max_chars if self.budget is not None else TEMPLATE_BASE_CHARS
        if type(value) is str:
            return len(value)
        total, stack, seen = 0, [value], 0
        while stack and total <= limit:
            item = stack.pop()
            seen += 1
            if isinstance(item, str):
                total += len(item) + 4
            elif isinstance(item, (list, tuple, set, frozenset, dict)):
                total += 2
                stack.extend(item.items() if isinstance(item, dict) else item)
            elif isinstance(item, Namespace):  # written as its attributes
                stack.append(dict(object.__getattribute__(item, "_Namespace__attrs")))
            else:
                total += 32
        self._charge(seen >> 4)
        return total

    def call_binop(self, context, operator, left, right):
        self._charge()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._refuse_size(f"'{operator}' of a {type(seq).__name__}", len(seq) * max(n, 0))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * (abs(left).bit_length() - 1) > TEMPLATE_MAX_INT_BITS:  # refused without computing the power
                raise self._too_big_number()
        elif operator == "%" and isinstance(left, str):
            self._check_printf(left, right)
        result = super().call_binop(context, operator, left, right)
        return self.scanned(self.checked(result, f"the result of '{operator}'"))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's own signature)
        __self._charge()
        from jinja2.runtime import LoopContext

        if isinstance(__obj, LoopContext) and args:  # loop(children) of a recursive loop: its items cost too
            args = (__self.loop_items(args[0]), *args[1:])
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, str):
            __self._check_str_method(receiver, getattr(__obj, "__name__", ""), args, kwargs)
        for value in (receiver, *args, *kwargs.values()):  # a method reads its object and arguments at C speed
            __self.scanned(value)
        return __self.scanned(__self.checked(super().call(__context, __obj, *args, **kwargs), "the result of a call"))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__

        def checked_format(*args, **kwargs):
            self._check_format(template, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked_format

    # --- checks before the steps that multiply sizes

    def _check_ints(self, what: str, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                self._refuse_size(what, value)

    def _check_printf(self, template: str, values) -> None:
        """'%*d' % (n, 1), '%10000000d' % 1: widths and precisions, written or given, are sizes; and each
        conversion may write the largest of the values ('%s%s%s' % (s, s, s))."""
        matches = list(_PRINTF_SIZES.finditer(template))
        sizes = [n for match in matches for n in match.groups()]
        self._refuse_size("a '%' format", _largest(sizes))
        values = values if isinstance(values, tuple) else (values,)
        if "*" in sizes:
            self._check_ints("a '%' format", values, {})
        self._check_fields("a '%' format", template, len(matches), [*values, *(v for d in values if isinstance(d, dict)
                                                                                 for v in d.values())])

    def _check_fields(self, what: str, template: str, fields: int, values) -> None:
        if fields and values:
            self._refuse_size(what, len(template) + fields * max(self.text_size(v) for v in values))

    def _check_format(self, template: str, args, kwargs) -> None:
        """'{:>10000000}'.format(1), '{:>{}}'.format(1, n)."""
        try:
            parsed = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
        except ValueError:  # not a valid format string: str.format will say so
            parsed = []
        specs = [spec for _, spec in parsed if spec]
        self._refuse_size("a str.format", _largest(re.findall(r"\d+", " ".join(specs))))
        mapping = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}  # format_map's
        if any("{" in spec for spec in specs):  # a width or precision given as an argument
            self._check_ints("a str.format", [*args, *mapping.values()], kwargs)
        self._check_fields("a str.format", template, len(parsed), [*args, *mapping.values(), *kwargs.values()])

    def _check_str_method(self, text: str, name: str, args, kwargs) -> None:
        if name in _STR_METHODS_OF_SIZE:
            self._check_ints(f"str.{name}", args, kwargs)
        elif name == "expandtabs":
            self._check_repeated("str.expandtabs", text, "\t", [*args, *kwargs.values()])
        elif name == "replace":
            self._check_replace(text, *args[:2])
        elif name == "join":
            self._check_join(text, args[0] if args else ())

    def _check_repeated(self, what: str, text: str, separator: str, widths) -> None:
        """indent(width) and expandtabs(width) write up to ``width`` characters at each line or tab."""
        width = max((len(w) if isinstance(w, str) else w for w in widths if isinstance(w, (int, str))), default=0)
        self._refuse_size(what, len(text) + (text.count(separator) + 1) * width)

    def _check_json_layout(self, layout) -> None:
        """tojson's indent and separators are written once per line or item: at most a few characters."""
        widths = [len(v) if isinstance(v, str) else v if isinstance(v, int) else sum(map(len, v)) for v in layout
                  if isinstance(v, (int, str)) or isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)]
        if max(widths, default=0) > TEMPLATE_MAX_JSON_INDENT:
            source = self.budget.source if self.budget is not None else "this tokenizer"
            raise TemplateTooCostly(f"the chat template of {source} asks tojson for an indent or separators of "
                                    f"{max(widths):,} characters; at most {TEMPLATE_MAX_JSON_INDENT} are allowed")

    def _check_replace(self, text, old=None, new=None, *rest) -> None:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
            count = len(text) + 1 if not old else text.count(old)
            self._refuse_size("a replace", len(text) + count * (len(new) - len(old)))

    def _check_join(self, separator, items) -> None:
        if isinstance(items, (list, tuple)):
            size = len(separator) * len(items) if isinstance(separator, str) else 0
            self._refuse_size("a join", size + self.text_size(items))

    def _check_sum(self, items, start) -> None:
        """sum(lists, start=[]) copies the growing list at each item: its length, and its cost, are checked."""
        lengths = [len(i) for i in (start, *items) if isinstance(i, (list, tuple))]
        if lengths:
            self._refuse_size("a sum of lists", sum(lengths))
            self._charge((len(lengths) * sum(lengths)) >> 4)

    def bounded_test(self, f):
        """The test ``f`` (``x is in y``, ``x is divisibleby 3``) at one operation a call, plus what it scans."""

        @functools.wraps(f)
        def test(*args, **kwargs):
            self._charge()
            for value in args:
                self.scanned(value)
            return f(*args, **kwargs)

        return test

    def bounded(self, f, name: str):
        """The filter ``f`` at one operation a call, with its sizes checked."""

        @functools.wraps(f)
        def filter(*args, **kwargs):
            values = args[1:] if getattr(f, "jinja_pass_arg", None) is not None else args  # after the context
            # A filter walks its value in Python, item by item or character by character (map, select, list,
            # sum, wordwrap, ...): one operation each, so that range(100000) | select(...) inside a loop pays.
            walks = name not in _CONSTANT_TIME_FILTERS and values and isinstance(values[0], (*_SIZED, range))
            self._charge(1 + (len(values[0]) if walks else 0))
            if name in _STRINGIFYING_FILTERS and values and not isinstance(values[0], str):
                self._refuse_size(f"the {name} filter", self.text_size(values[0]))  # str(a list) first
            if name in _WIDTH_FILTERS:
                self._check_ints(f"the {name} filter", values[1:], kwargs)
            elif name == "indent" and values:
                self._check_repeated("the indent filter", str(values[0]), "\n", [*values[1:2], kwargs.get("width")])
            elif name == "tojson":
                self._check_json_layout([*values[2:4], kwargs.get("indent"), kwargs.get("separators")])
            elif name == "replace" and len(values) >= 3:
                self._check_replace(str(values[0]), *values[1:3])
            elif name == "join" and values:
                items = list(values[0]) if not isinstance(values[0], (str, dict)) else values[0]
                self.checked(items, "the list to join")
                self._check_join(values[1] if len(values) > 1 else kwargs.get("d", ""), items)
                values = (items, *values[1:])
                args = (args[0], *values) if len(args) > len(values) else values
            elif name == "format" and values and isinstance(values[0], str):
                self._check_printf(values[0], tuple(values[1:]) + tuple(kwargs.values()))
            elif name == "sum" and values and not isinstance(values[0], (str, dict)):
                items = list(values[0])
                self._check_sum(items, values[3] if len(values) > 3 else kwargs.get("start", 0))
                values = (items, *values[1:])
                args = (args[0], *values) if len(args) > len(values) else values
            return self.scanned(self.checked(f(*args, **kwargs), f"the result of the {name} filter"))

        return filter

    # --- what is written, loops, ~ and comparisons pay as they go: each piece of text written passes through
    # written, each for loop's items through loop_items, each ~ through tilde, each operand of a comparison
    # through scanned

    def _parse(self, source, name, filename):
        from jinja2 import nodes

        tree = super()._parse(source, name, filename)
        for output in tree.find_all(nodes.Output):  # everything written, even where a block captures it
            output.nodes = [nodes.Filter(n, _WRITTEN_FILTER, [], [], None, None, lineno=n.lineno) for n in output.nodes]
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
        for compare in tree.find_all(nodes.Compare):  # a == b, a in b: the operands are scanned
            compare.expr = nodes.Filter(compare.expr, _SCANNED_FILTER, [], [], None, None, lineno=compare.lineno)
            for operand in compare.ops:
                operand.expr = nodes.Filter(operand.expr, _SCANNED_FILTER, [], [], None, None, lineno=compare.lineno)
        def budgeted(node):
            if isinstance(node, nodes.Concat):  # a ~ b ~ c -> [a, b, c] | ortlora_concat
                return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT_FILTER, [], [], None, None,
                                    lineno=node.lineno)
            if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):  # s[1:], which jinja copies
                return nodes.Filter(node, _SCANNED_FILTER, [], [], None, None, lineno=node.lineno)  # unhooked
            return node

        for node in [tree, *tree.find_all(nodes.Node)]:
            for field in node.fields:
                value = getattr(node, field, None)
                if isinstance(value, nodes.Node):
                    setattr(node, field, budgeted(value))
                elif isinstance(value, list):
                    setattr(node, field, [budgeted(v) for v in value])
        return tree


_LOOP_FILTER = "ortlora_loop_budget"  # for x in (xs | ortlora_loop_budget): each item costs one operation
_CONCAT_FILTER = "ortlora_concat"  # [a, b] | ortlora_concat: a ~ b with its size checked first
_WRITTEN_FILTER = "ortlora_written"  # {{ x | ortlora_written }}: what is written counts
_SCANNED_FILTER = "ortlora_scanned"  # (a | ortlora_scanned) == (b | ortlora_scanned): what a comparison reads
