"""README.md tells the truth: a user who copies its code gets code that works.

- the Python blocks that need no files (the ``tiny`` preset: forward, generate, a few-shot
  prefix, transition scores, scoring) run as they are, and give results of the right shapes;
- in every Python block, each call of a fastflamingo function or method binds to its real
  signature, so the blocks that need checkpoints or data files cannot name a function or an
  argument that does not exist;
- every ``fastflamingo <subcommand> ...`` command line, in README and in the subcommands' own
  ``--help`` examples, parses with the real command-line parser;
- every ``--flag`` README names is an option of some subcommand, or of another tool README names;
- in the prose's inline `code` spans: each call of a fastflamingo function or method binds to its
  signature, each dotted ``fastflamingo.`` name exists, each repository path exists, each
  ``FASTFLAMINGO_*`` variable is read by the package, and the preset list is the package's.

The blocks, command lines, flags and spans are read from README.md itself, never copied here, so
a renamed function, argument, flag, file or variable fails one of these tests, naming its line in
README.md.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastflamingo
from fastflamingo.cli import build_parser

README = Path(__file__).parents[1] / "README.md"

# Flags in README.md that belong to other tools README shows, not to fastflamingo's command line.
OTHER_TOOLS = {
    "--no-deps": "pip's: `pip install --no-deps open-flamingo==2.0.1` in the set-up line",
    "--nproc-per-node": "torchrun's: `torchrun --nproc-per-node N -m fastflamingo.cli finetune ...`",
    "--classification_prompt_ensembling": "open_flamingo's evaluation script's flag, which "
                                          "`--prompt-ensembling` mirrors",
}


@dataclass
class Block:
    """A fenced code block: its language, the README line of its first code line, its code."""
    lang: str
    line: int
    code: str


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[Block]:
    blocks, lang, start, lines = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, start, lines = line.strip()[3:].strip(), n + 1, []
            else:
                blocks.append(Block(lang, start, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"README.md: the code block opened at line {start - 1} is never closed"
    return blocks


def python_blocks(text: str) -> list[Block]:
    return [b for b in fenced_blocks(text) if b.lang == "python"]


def block_with(blocks: list[Block], needle: str) -> Block:
    """The one Python block containing ``needle``: blocks are found by what they do, not by place."""
    found = [b for b in blocks if needle in b.code]
    if not found:
        pytest.fail(f"README.md has no Python block containing {needle!r}: the test expects one "
                    f"(update tests/test_readme.py if README.md dropped it on purpose)")
    assert len(found) == 1, f"{needle!r} is in several Python blocks (lines {[b.line for b in found]})"
    return found[0]


def prose(text: str) -> str:
    """README.md with its fenced blocks blanked out, line numbers kept."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line, text) of every inline `code` span outside the fenced blocks (a span may wrap a
    line, not a paragraph), whitespace collapsed."""
    body = prose(text)
    return [(body.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()))
            for m in re.finditer(r"(`+)((?:(?!\n\s*\n)[^`])+?)\1", body)]


def run_block(block: Block, namespace: dict) -> None:
    """Run a README block as it is; tracebacks point at README.md's own lines."""
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    exec(code, namespace)  # noqa: S102 - README's own code, the point of the test


def define(namespace: dict, **names) -> None:
    """The names a block uses and README leaves to the reader; never one README defines itself,
    which the test would then silently replace."""
    clash = sorted(set(names) & set(namespace))
    assert not clash, f"README's blocks define {clash} themselves: drop them from the test's set-up"
    namespace.update(names)


# --- 1. the blocks that need no files run -------------------------------------------------------

def test_runnable_python_blocks_run():
    """The "Use" block (the tiny preset, forward, generate), then the generation block (beams, a
    few-shot prefix, transition scores) and the scoring block, in one namespace as a reader runs
    them, after a set-up of only the names README leaves undefined (the prompt's attention mask,
    the demonstrations and queries, the synthetic world's tokenizer and class names)."""
    from fastflamingo.evaluation import synthetic
    blocks = python_blocks(readme_text())
    use = block_with(blocks, 'Flamingo.from_preset("tiny")')
    generation = block_with(blocks, "encode_prefix")
    scoring = block_with(blocks, "model.score(")
    torch.manual_seed(0)
    ns: dict = {}

    run_block(use, ns)
    model, lang_x, out = ns["model"], ns["lang_x"], ns["out"]
    c = model.config
    vocab = model.lang_encoder.get_input_embeddings().weight.shape[0]
    assert (c.media_token_id, c.eoc_token_id, vocab) == (510, 511, 512), "the tiny preset's ids changed"
    assert out.logits.shape == (*lang_x.shape, vocab) and torch.isfinite(out.logits).all()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    tokens = ns["tokens"]
    assert tokens.shape[0] == 1 and lang_x.shape[1] < tokens.shape[1] <= lang_x.shape[1] + 8
    assert torch.equal(tokens[:, :lang_x.shape[1]], lang_x)

    # two demonstrations of one image each, then two one-image queries
    define(ns, attention_mask=torch.ones_like(lang_x),
           demo_vision_x=torch.randn(1, 2, 1, 3, 32, 32), demo_lang_x=torch.tensor([[510, 5, 6, 511, 510, 7, 8, 511]]),
           query_vision_x=torch.randn(2, 1, 1, 3, 32, 32), query_lang_x=torch.tensor([[510, 12, 13], [510, 14, 15]]))
    run_block(generation, ns)
    query, tokens = ns["query_lang_x"], ns["tokens"]   # tokens: the queries' after the prefix
    assert tokens.shape[0] == 2 and query.shape[1] < tokens.shape[1] <= query.shape[1] + 8
    assert torch.equal(tokens[:, :query.shape[1]], query)
    out, logp = ns["out"], ns["logp"]
    new = out.sequences.shape[1] - lang_x.shape[1]
    assert out.sequences.shape[0] == 1 and 0 < new <= 8 and len(out.scores) == new
    assert logp.shape == (1, new) and torch.isfinite(logp).all() and (logp <= 0).all()

    define(ns, tokenizer=synthetic.tokenizer(), class_names=list(synthetic.NAMES))
    run_block(scoring, ns)
    classes, logprobs = ns["classes"], ns["logprobs"]
    unk = ns["tokenizer"].unk_token_id
    assert len(classes) == len(synthetic.NAMES) and all(ids and unk not in ids for ids in classes)
    assert logprobs.shape == (1, len(classes)) and torch.isfinite(logprobs).all() and (logprobs <= 0).all()


# --- 2. every fastflamingo call binds to its signature ------------------------------------------

def _model_kwargs():
    """Where a callee's ``**kwargs`` passes its keywords on, the names the receiving end takes
    (``bind`` alone would take any keyword there). Flamingo.forward's ``**lm_kwargs`` (the LM's)
    and from_preset's ``**overrides`` (config fields) are not checked."""
    from fastflamingo import factory, generation

    def keyword_only(f):
        return {p.name for p in inspect.signature(f).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {
        fastflamingo.Flamingo.generate: keyword_only(generation.generate),
        fastflamingo.Flamingo.score: keyword_only(generation.score),
        # create_model_and_transforms checks its **flamingo_kwargs against this set itself
        factory.create_model_and_transforms: set(factory._FLAMINGO_KWARGS),
    }


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything else (a call's result, a subscript)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _getattr_path(obj, root: str, path: list[str]):
    """obj.path[0].path[1]...; a submodule not imported yet is imported."""
    for i, name in enumerate(path):
        if not hasattr(obj, name) and inspect.ismodule(obj):
            with contextlib.suppress(ImportError):
                importlib.import_module(f"{obj.__name__}.{name}")
        if not hasattr(obj, name):
            raise AttributeError(f"{'.'.join([root, *path[:i + 1]])} does not exist")
        obj = getattr(obj, name)
    return obj


def _call_failures(block: Block, model, names: dict | None = None) -> tuple[list[str], int]:
    """(the failures, the number of calls checked) in one block; ``names``: more call roots."""
    tree = ast.parse(block.code)
    failures, checked, names = [], 0, dict(names or {})
    for node in ast.walk(tree):  # the block's ``from fastflamingo... import name``
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fastflamingo":
            for alias in node.names:
                try:
                    names[alias.asname or alias.name] = getattr(importlib.import_module(node.module), alias.name)
                except (ImportError, AttributeError) as e:
                    failures.append(f"README.md:{block.line + node.lineno - 1}: from {node.module} import "
                                    f"{alias.name}: {e}")
    roots = {"fastflamingo": fastflamingo, "model": model, **names}
    forwarded = _model_kwargs()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not (path := _dotted(node.func)) or path[0] not in roots:
            continue
        where = f"README.md:{block.line + node.lineno - 1}: {ast.unparse(node)}"
        # model(...) is model.forward(...): nn.Module's __call__ takes (*args, **kwargs)
        path = path + ["forward"] if path == ["model"] else path
        try:
            f = _getattr_path(roots[path[0]], path[0], path[1:])
        except AttributeError as e:
            failures.append(f"{where}: {e}")
            continue
        # a call with *args / **kwargs unpacking binds to anything we could not know: skipped
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            continue  # a callable without a signature (none in README today) cannot be checked
        checked += 1
        # `f(..., x=1)` in prose: `...` stands for the arguments left out; the rest must still fit
        dots = [i for i, a in enumerate(node.args) if isinstance(a, ast.Constant) and a.value is Ellipsis]
        binder = sig.bind_partial if dots else sig.bind
        args = node.args[:dots[0]] if dots else node.args
        try:
            bound = binder(*args, **{k.arg: k.value for k in node.keywords})
        except TypeError as e:
            failures.append(f"{where}: {e} (signature {path[-1]}{sig})")
            continue
        var_kw = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        taken = forwarded.get(getattr(f, "__func__", f))
        if var_kw and taken is not None:
            unknown = sorted(set(bound.arguments.get(var_kw[0], {})) - taken)
            if unknown:
                failures.append(f"{where}: {path[-1]} passes {unknown} on through **{var_kw[0]}, which takes "
                                f"only {sorted(taken)}")
    return failures, checked


def test_fastflamingo_calls_bind_to_their_signatures():
    """Every Python block, the ones that need checkpoints or data (from_open_flamingo,
    create_model_and_transforms, from_idefics, save/from_pretrained, the evaluation harness and
    its loaders) included: each call of ``fastflamingo.X.Y(...)``, of a name the block imports
    from fastflamingo, or of a method of ``model`` (a real tiny Flamingo: bound methods), binds
    its arguments to the callee's real signature; a keyword a ``**kwargs`` passes on to
    generation's ``generate`` / ``score`` or open_flamingo's factory must be one they take."""
    model = fastflamingo.Flamingo.from_preset("tiny")
    blocks = python_blocks(readme_text())
    assert blocks, "README.md has no Python block"
    failures, checked = [], 0
    for block in blocks:
        f, n = _call_failures(block, model)
        failures += f
        checked += n
    assert not failures, "README calls that do not fit fastflamingo's API:\n" + "\n".join(failures)
    assert checked >= 10, f"only {checked} fastflamingo calls found in README's Python blocks: is the parsing broken?"


# --- 3. command lines parse ---------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line, line) with shell continuations (a trailing backslash) joined."""
    out, pending, start = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _commands(line: str) -> list[list[str]]:
    """The argument lists after ``fastflamingo`` (or ``-m fastflamingo.cli``) of each command
    of a shell line: ``a && fastflamingo bench`` has one; ``[]`` when none."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True  # and "#" starts a comment, as in a shell
    commands, words = [], []
    for word in [*lexer, ";"]:
        if word and set(word) <= set(";&|"):
            if words[:1] == ["fastflamingo"]:
                commands.append(words[1:])
            elif "fastflamingo.cli" in words[1:] and words[words.index("fastflamingo.cli") - 1] == "-m":
                commands.append(words[words.index("fastflamingo.cli") + 1:])
            words = []
        else:
            words.append(word)
    return [argv for argv in commands if argv]  # a bare `fastflamingo` is the package's name


def _parse_error(argv: list[str]) -> str | None:
    """Why the real parser refuses ``fastflamingo argv``; None when it takes it. A ``...`` that is
    no option's value stands for arguments left out: it is dropped, and the options it may stand
    for are not demanded (the others are still parsed, values and choices included)."""
    parser = build_parser()
    sub = _subparsers(parser).get(argv[0]) if argv else None
    if sub is not None and "..." in argv:
        takes_value = {s for a in sub._actions if a.nargs != 0 for s in a.option_strings}
        argv = [w for i, w in enumerate(argv) if w != "..." or argv[i - 1] in takes_value]
        for action in sub._actions:
            action.required = False
        for group in sub._mutually_exclusive_groups:
            group.required = False
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):
            return None  # `fastflamingo <sub> --help`: prints the help and exits 0
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit status {e.code}"
    return None


def test_readme_command_lines_parse():
    """Every ``fastflamingo <subcommand> ...`` line in README's shell blocks (continuations
    joined, each command of a ``&&`` chain) and inline code spans parses with
    ``fastflamingo.cli.build_parser()``. A span that is only ``fastflamingo <subcommand>`` names
    the subcommand in the prose (``fastflamingo convert`` needs arguments): it must be one."""
    text = readme_text()
    lines = []
    for block in fenced_blocks(text):
        if block.lang != "python":
            lines += [(block.line + n - 1, line) for n, line in _logical_lines(block.code)]
    spans = inline_spans(text)
    subcommands = set(_subparsers(build_parser()))
    failures, seen = [], 0
    for n, span in spans:
        words = span.split()
        if len(words) == 2 and words[0] == "fastflamingo" and re.fullmatch(r"[a-z][a-z-]*", words[1]):
            seen += 1
            if words[1] not in subcommands:
                failures.append(f"README.md:{n}: `{span}`: no subcommand {words[1]!r} (there are {sorted(subcommands)})")
        else:
            lines.append((n, span))
    for n, line in lines:
        for argv in _commands(line):
            seen += 1
            if (error := _parse_error(argv)) is not None:
                failures.append(f"README.md:{n}: fastflamingo {shlex.join(argv)}\n    {error}")
    assert not failures, "README command lines the parser refuses:\n" + "\n".join(failures)
    assert seen >= 10, f"only {seen} fastflamingo command lines found in README.md: is the parsing broken?"


def test_help_examples_parse():
    """The example lines in each subcommand's own help text (its description and epilog, e.g.
    ``fastflamingo generate --help``'s "Examples::") parse with the real parser."""
    failures, seen = [], 0
    for name, sub in _subparsers(build_parser()).items():
        help_text = "\n".join(t for t in (sub.description, sub.epilog) if t)
        for _, line in _logical_lines(help_text):
            if not line.strip().startswith("fastflamingo "):
                continue
            for argv in _commands(line.strip()):
                seen += 1
                if (error := _parse_error(argv)) is not None:
                    failures.append(f"fastflamingo {name} --help: {line.strip()}\n    {error}")
    assert not failures, "help examples the parser refuses:\n" + "\n".join(failures)
    assert seen >= 10, f"only {seen} example lines found in the subcommands' help: is the parsing broken?"


# --- 4. flags exist -----------------------------------------------------------------------------

def test_every_readme_flag_is_an_option():
    """Every ``--flag`` anywhere in README.md is an option of some fastflamingo subcommand, but
    for the other tools' flags listed in OTHER_TOOLS (each of which README must still name)."""
    options = {s for sub in _subparsers(build_parser()).values() for a in sub._actions for s in a.option_strings}
    text = readme_text()
    flags = [(n, m.group()) for n, line in enumerate(text.splitlines(), 1)
             for m in re.finditer(r"(?<![\w-])--[A-Za-z][\w-]*", line)]
    assert len(flags) >= 10, f"only {len(flags)} flags found in README.md: is the parsing broken?"
    unknown = [f"README.md:{n}: {flag}" for n, flag in flags if flag not in options and flag not in OTHER_TOOLS]
    stale = sorted(set(OTHER_TOOLS) - {flag for _, flag in flags})
    assert not unknown, ("README flags that no fastflamingo subcommand has (another tool's? then add it to "
                         "OTHER_TOOLS):\n" + "\n".join(unknown))
    assert not stale, f"OTHER_TOOLS lists flags README no longer names: {stale}"


# --- 5. the prose's inline code spans -----------------------------------------------------------

# Calls in inline spans whose callee is another library's (the span names it as such).
OTHER_CALLS = {"tokenizer.save_pretrained"}
# Where a bare name in an inline span (``quantize_model(...)``) is looked up: the package's modules a
# README paragraph is about; a name found in none of them is a failure.
BARE_NAME_HOMES = ("fastflamingo", "fastflamingo.quant", "fastflamingo.training", "fastflamingo.evaluation",
                   "fastflamingo.evaluation.datasets", "fastflamingo.generation", "fastflamingo.ops")
REPO = README.parent
PATH_ROOTS = ("fastflamingo/", "kernels/", "tests/", "benchmarks/", "csrc/", "generation/")


def _inline_expressions(text: str) -> list[tuple[int, str, ast.expr]]:
    out = []
    for line, span in inline_spans(text):
        with contextlib.suppress(SyntaxError):
            out.append((line, span, ast.parse(span, mode="eval").body))
    return out


def _bare_name(name: str, model):
    """A bare name of an inline span: a method of ``model`` or a name in one of BARE_NAME_HOMES."""
    if hasattr(model, name):
        return getattr(model, name)
    for home in BARE_NAME_HOMES:
        module = importlib.import_module(home)
        if hasattr(module, name):
            return getattr(module, name)
    return None


def test_inline_calls_bind_to_their_signatures():
    """`model.cache_media(lang_x, vision_x)`, `quantize_model(model, "nf4", fused=True)`,
    `from_pretrained(dir, lang_encoder=..., quantization="nf4")`: each inline call of a
    fastflamingo function binds to its signature (``...`` stands for any argument)."""
    model = fastflamingo.Flamingo.from_preset("tiny")
    failures, checked = [], 0
    for line, span, expr in _inline_expressions(readme_text()):
        for node in ast.walk(expr):
            if not isinstance(node, ast.Call) or not (path := _dotted(node.func)):
                continue
            if ".".join(path) in OTHER_CALLS:
                continue
            names = {}
            if path[0] not in ("fastflamingo", "model"):
                target = _bare_name(path[0], model)
                if target is None:
                    failures.append(f"README.md:{line}: `{span}`: {path[0]} is not a fastflamingo name "
                                    f"(looked in model and {', '.join(BARE_NAME_HOMES)}; another library's "
                                    f"call goes in OTHER_CALLS)")
                    continue
                names[path[0]] = target
            f, n = _call_failures(Block("python", line, ast.unparse(node) + "\n"), model, names)
            failures += [x.replace(f"README.md:{line}:", f"README.md:{line}: `{span}`:", 1) for x in f]
            checked += n
    assert not failures, "README's inline calls that do not fit fastflamingo's API:\n" + "\n".join(failures)
    assert checked >= 10, f"only {checked} inline calls checked: is the parsing broken?"


def test_inline_names_paths_and_variables_exist():
    text = readme_text()
    failures = []
    for line, span, expr in _inline_expressions(text):
        path = _dotted(expr)
        if path and path[0] == "fastflamingo" and len(path) > 1:
            try:
                _getattr_path(fastflamingo, "fastflamingo", path[1:])
            except AttributeError as e:
                failures.append(f"README.md:{line}: `{span}`: {e}")
    source = "\n".join(p.read_text(encoding="utf-8") for d in ("fastflamingo", "kernels", "tests", "benchmarks")
                       for p in (REPO / d).rglob("*.py"))
    paths = 0
    for line, span in inline_spans(text):
        for var in re.findall(r"\bFASTFLAMINGO_[A-Z0-9_]+", span):
            if f'"{var}"' not in source:
                failures.append(f"README.md:{line}: `{span}`: no code reads the variable {var}")
        if span.startswith(PATH_ROOTS) and " " not in span:
            paths += 1
            where = REPO / "fastflamingo" if span.startswith("generation/") else REPO
            if not list(where.glob(span.rstrip("/"))):
                failures.append(f"README.md:{line}: `{span}`: no such file or folder in the repository")
    assert not failures, "README names what does not exist:\n" + "\n".join(failures)
    assert paths >= 20, f"only {paths} repository paths found in README's spans: is the parsing broken?"


def test_readme_preset_list_is_the_packages():
    paragraph = next((p for p in prose(readme_text()).split("\n\n") if p.startswith("Presets (")), None)
    assert paragraph is not None, "README.md has no paragraph starting 'Presets (' (update this test if moved)"
    listed = re.findall(r"`([a-z0-9-]+)`", paragraph)
    assert listed == list(fastflamingo.PRESETS), (listed, list(fastflamingo.PRESETS))
