"""The `glmkit` command: run the demo cluster, generate text, benchmark, inspect or repack SAT checkpoints."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import typing

from .config import load_config
from .escapes import unescape
from .generate.sampling import DESCRIPTIONS, GenerationSettings
from .tokenizer import MASK_PATTERN


def _generate(args) -> int:
    from .generate.pipeline import GLMPipeline

    overrides = {k: v for k, v in (("dtype", args.dtype), ("device", args.device)) if v}
    # Only the flags given reach the settings: every other field keeps GenerationSettings' default.
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings) if hasattr(args, f.name)}
    if "stop" in kwargs:
        kwargs["stop"] = tuple(kwargs["stop"])
    GenerationSettings.from_kwargs(**kwargs)  # bad settings fail before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    started = time.perf_counter()
    pipeline = GLMPipeline.from_config(args.config, **overrides)
    loaded = time.perf_counter()
    stream = _InPlaceStream(prompt) if args.stream else None
    result = pipeline.generate(prompt, on_text=stream, **kwargs)
    done = time.perf_counter()
    if stream is not None:
        stream.finish(result)
    logprobs = [_logprob_rows(pipeline.tokenizer, b.logprobs) for b in result.blanks] \
        if result.blanks and result.blanks[0].logprobs is not None else None
    if args.json:
        record = {"prompt": result.prompt, "text": result.text,
                  "blanks": [b.text for b in result.blanks], "finish_reason": result.finish_reason,
                  "prompt_tokens": result.num_prompt_tokens,
                  "generated_tokens": result.num_generated_tokens,
                  "load_seconds": round(loaded - started, 3),
                  "generate_seconds": round(done - loaded, 3)}
        if logprobs is not None:
            record["logprobs"] = logprobs
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if stream is None:
        print(result.text)
    for number, rows in enumerate(logprobs or (), start=1):
        print(f"\nblank {number}: token, logprob, top alternatives")
        for row in rows:
            top = "  ".join(f"{piece!r} {lp:.3f}" for piece, lp in row["top"])
            print(f"  {row['piece']!r:<16} {row['logprob']:8.3f}  {top}")
    return 0


class _InPlaceStream:
    """Streams a generation in reading order: the prompt's text up to each mask, then that blank's tokens.

    `finish(result)` writes the text after the last blank; should the stream not spell out `result.text`
    (text held back as a possible stop string, then kept), the filled text follows on its own.
    """

    def __init__(self, prompt: str):
        self.pieces = MASK_PATTERN.split(prompt)  # text around the masks; no mask: the whole prompt
        self.blank = 0  # the blank being streamed; pieces[:blank + 1] are written
        self.written: list[str] = []
        self._write(self.pieces[0])

    def _write(self, text: str) -> None:
        self.written.append(text)
        print(text, end="", flush=True)

    def _advance(self, blank: int) -> None:
        while self.blank < blank:  # the blanks before are done: the text after each comes next
            self.blank += 1
            if self.blank < len(self.pieces):
                self._write(self.pieces[self.blank])

    def __call__(self, event) -> None:
        self._advance(event.blank)
        self._write(event.text)

    def finish(self, result) -> None:
        """End the stream with the rest of the prompt, and the filled text if the stream differs from it."""
        self._advance(len(self.pieces) - 1)
        if "".join(self.written) != result.text:
            print(f"\n\nfilled text:\n{result.text}", end="")
        print()


def _logprob_rows(tokenizer, records) -> list[dict]:
    """One blank's TokenLogprob records as plain rows with the pieces spelled out."""
    return [{"token": r.token, "piece": tokenizer.id_to_piece(r.token), "logprob": round(r.logprob, 4),
             "top": [(tokenizer.id_to_piece(t), round(lp, 4)) for t, lp in r.top]} for r in records or ()]


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per GenerationSettings field: name, type and default from the field, help from DESCRIPTIONS."""
    hints = typing.get_type_hints(GenerationSettings)
    for f in dataclasses.fields(GenerationSettings):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        # Unset flags are left out of the namespace, so the dataclass default is the only default.
        options = dict(default=argparse.SUPPRESS, help=f"{DESCRIPTIONS[f.name]} (default: {f.default!r})")
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is tuple:
            options.update(action="append", type=unescape, metavar="TEXT",
                           help=f"{DESCRIPTIONS[f.name]}; repeatable; \\n newline, \\t tab, \\s space, \\\\ "
                                f"backslash, as in the Playground")
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]  # int | None -> int
            options.update(type=args[0], metavar=args[0].__name__.upper())
        parser.add_argument(flag, **options)


def _demo(args) -> int:
    from .serve.cluster import GLMCluster

    times = {}
    started = time.perf_counter()
    cluster = GLMCluster(config=args.config, n=args.engines)
    try:
        cluster.start()
        times["start engines"] = time.perf_counter() - started
        mark = time.perf_counter()
        status = cluster.load(args.config)
        times["load shards"] = time.perf_counter() - mark
        print(status[["engine", "rank", "device", "shard", "load_seconds"]].to_string(index=False))
        mark = time.perf_counter()
        print(f"\nprompt: {args.prompt!r}\nstream: ", end="", flush=True)
        result = cluster.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                                  on_text=lambda event: print(event.text, end="", flush=True))
        times["generate"] = time.perf_counter() - mark
        print(f"\n\nfilled: {result.text!r}")
        print(f"{result.num_generated_tokens} tokens, finish reason: {result.finish_reason}")
    finally:
        mark = time.perf_counter()
        cluster.close()
        times["stop engines"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - started
    print("\ntime breakdown:")
    for step, seconds in times.items():
        print(f"  {step:<14} {seconds:6.2f} s")
    return 0


def _repack(args) -> int:
    from .checkpoint import config_from_checkpoint, repack_checkpoint

    # The checkpoint describes itself (model_config.json, else its tensor shapes); --config overrides.
    config = load_config(args.config).model if args.config else config_from_checkpoint(args.src)
    repack_checkpoint(args.src, args.dst, args.shards, config)
    print(f"wrote {args.shards} shard(s) to {args.dst}")
    return 0


def _inspect(args) -> int:
    from .checkpoint import check_checkpoint, config_from_checkpoint

    if args.config:
        config, source = load_config(args.config).model, args.config
    else:
        try:
            config, source = config_from_checkpoint(args.dir), "model_config.json and shard shapes"
        except ValueError as error:
            raise ValueError(f"{error}; or name the architecture with --config") from None
    # The same checks as loading (latest, shard count, keys, shapes, dtypes), on every shard, without reading
    # tensor data.
    check = check_checkpoint(args.dir, config)
    info = check.info
    print(json.dumps({"dir": str(info.dir), "iteration": info.iteration, "num_shards": info.num_shards,
                      "shards": [str(p) for p in info.shard_paths], "model_config": info.model_config,
                      "checked_against": source,
                      "quantization": None if check.quantization is None else f"int{check.quantization}",
                      "tensors": check.num_tensors, "dtypes": list(check.dtypes)}, indent=2))
    return 0


def _bench(args) -> int:
    from .lab.bench import BenchOptions, resolve_config, run_bench

    name, model, kit = resolve_config(args.config, args.layers)
    if args.probe:
        return _bench_probe(args, model, kit)
    if args.engines is not None:
        return _bench_engines(args, model, kit)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ValueError(f"--batches takes comma-separated integers such as 1,8,32, got {args.batches!r}") from None
    options = BenchOptions(
        config=model, config_name=name, **_bench_precision(args, kit),
        tp=args.tp, batches=batches, prompt_tokens=args.prompt_tokens, new_tokens=args.tokens,
        repeats=args.repeats, copy_bytes=args.copy_mib * 2**20 if args.copy_mib else None,
        against=args.against, seed=args.seed, verify_context=args.verify_context,
        kernel_configs=args.kernel_configs, all_reduce=args.all_reduce)
    with contextlib.redirect_stdout(sys.stderr):  # whatever SAT or torch print, stdout carries only the JSON
        result = run_bench(options)
    return _print_json(result, args.out)


def _bench_precision(args, kit) -> dict:
    # A YAML config supplies dtype, device and quantization unless they are given here; presets default to
    # fp16 on CUDA.
    return {"dtype": args.dtype or (kit.dtype if kit else "fp16"),
            "device": args.device or (kit.device if kit else "cuda"),
            "quantization": args.quantization or (kit.quantization if kit else None)}


def _print_json(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


def _bench_engines(args, model, kit) -> int:
    from .lab.engine_bench import run_engine_bench
    from .tokenizer import DEMO_TOKENIZER_DIR

    if args.engines < 1:
        raise ValueError(f"--engines takes the number of engines (at least 1), got {args.engines}")
    tokenizer = kit.tokenizer if kit is not None and kit.tokenizer is not None else DEMO_TOKENIZER_DIR
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        result = run_engine_bench(model, engines=args.engines, **_bench_precision(args, kit), tokenizer=tokenizer,
                                  prompt_tokens=args.prompt_tokens, new_tokens=args.tokens, repeats=args.repeats,
                                  seed=args.seed, copy_bytes=args.copy_mib * 2**20 if args.copy_mib else None,
                                  pipeline=not args.no_pipeline)
    return _print_json(result, args.out)


def _bench_probe(args, model, kit) -> int:
    from .lab.probe_bench import run_probe_bench
    from .tokenizer import DEMO_TOKENIZER_DIR

    engines = 1 if args.engines is None else args.engines
    if engines < 1:
        raise ValueError(f"--engines takes the number of engines (at least 1), got {engines}")
    tokenizer = kit.tokenizer if kit is not None and kit.tokenizer is not None else DEMO_TOKENIZER_DIR
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        result = run_probe_bench(model, engines=engines, **_bench_precision(args, kit), tokenizer=tokenizer,
                                 prompt_tokens=args.prompt_tokens, patch_positions=args.patch_positions,
                                 repeats=args.repeats, seed=args.seed, pipeline=not args.no_pipeline)
    return _print_json(result, args.out)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="glmkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="fill the [MASK]/[sMASK]/[gMASK] blanks of a prompt")
    gen.add_argument("prompt", help="the prompt; '-' reads it (newlines included) from standard input")
    gen.add_argument("--config", default="glm-tiny", help="config name under configs/ or a YAML path")
    gen.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    gen.add_argument("--device")
    add_generation_flags(gen)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--json", action="store_true", help="print the result as one JSON object")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="start a demo cluster (CPU engines), load the demo model, generate")
    demo.add_argument("--config", default="glm-tiny")
    demo.add_argument("--engines", type=int, default=2, help="number of engines (tensor-parallel ranks)")
    demo.add_argument("--prompt", default="def [MASK](self, other):\n    return self.value + other.value")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.set_defaults(run=_demo)

    repack = commands.add_parser("repack", help="rewrite a SAT checkpoint with another shard count")
    repack.add_argument("src")
    repack.add_argument("dst")
    repack.add_argument("--shards", type=int, required=True)
    repack.add_argument("--config", help="config naming the model architecture (default: the checkpoint's "
                                         "model_config.json, else its tensor shapes)")
    repack.set_defaults(run=_repack)

    bench = commands.add_parser("bench", help="decode/prefill speed on random weights against the bandwidth "
                                              "floor; prints one JSON object")
    bench.add_argument("--config", default="glm-130b", help="preset, config name under configs/, or a YAML path")
    bench.add_argument("--layers", type=int, help="override the number of layers (e.g. 12 of GLM-130B)")
    bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: the YAML's, else fp16")
    bench.add_argument("--device", help="default: the YAML's, else cuda")
    bench.add_argument("--quantization", choices=["int8", "int4"], help="weight-only quantization")
    bench.add_argument("--tp", type=int, default=1, help="tensor-parallel processes, one GPU each")
    bench.add_argument("--batches", default="1", help="comma-separated batch sizes, e.g. 1,8,32")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (prefill)")
    bench.add_argument("--tokens", type=int, default=64, help="tokens generated per timed run")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions per median")
    bench.add_argument("--copy-mib", type=int, help="bandwidth buffer in MiB (default 1024 on GPU, 64 on CPU)")
    bench.add_argument("--against", choices=["sat"], help="also time SAT's GLM130B on the same weights")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--verify-context", action="store_true",
                       help="prefill and decode the longest batch-1 context estimated to fit (tp 1)")
    bench.add_argument("--kernel-configs", help="tuned INT8/INT4 kernel launch parameters (JSON from "
                       "scripts/bench_quant.py --write-configs); default: configs/int_kernels.json")
    bench.add_argument("--all-reduce", choices=["auto", "nccl"], default="auto",
                       help="tp > 1: 'auto' sums decode activations through torch symmetric memory where the "
                       "GPUs allow it, 'nccl' always uses NCCL")
    bench.add_argument("--engines", type=int, help="time generate() through a GLMCluster of this many engines "
                       "(and GLMPipeline in this process) instead of the in-process generation loop")
    bench.add_argument("--no-pipeline", action="store_true", help="with --engines or --probe: skip the in-process "
                       "pipeline")
    bench.add_argument("--probe", action="store_true", help="time the logit lens (all layers and positions) and a "
                       "patching sweep (layers x --patch-positions) through a GLMCluster of --engines engines "
                       "(default 1) and GLMPipeline")
    bench.add_argument("--patch-positions", type=int, default=32, help="with --probe: the last positions patched")
    bench.add_argument("--out", help="also write the JSON to this file")
    bench.set_defaults(run=_bench)

    inspect = commands.add_parser("inspect", help="check a SAT checkpoint as loading would (without reading "
                                                  "tensor data) and show its iteration, shards and config")
    inspect.add_argument("dir")
    inspect.add_argument("--config", help="config naming the architecture to check against (default: "
                                          "model_config.json and the shard shapes)")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse `argv` and run the command, turning user errors into one-line messages."""
    from .lab.sat_reference import SATUnavailableError

    args = build_parser().parse_args(argv)
    # Loading or building a model tensor by tensor fragments the CUDA caching allocator (a 3.3 GB KV cache
    # failed with 12 GB free next to GLM-130B in INT4); growable segments avoid it. Read at the first CUDA
    # allocation, so it is set before any command runs; a value the user set wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        return args.run(args)
    except (ValueError, OSError, NotImplementedError, SATUnavailableError) as error:
        # glmkit's own errors name the parameter and the fix: one line, no traceback. OSError covers
        # missing files and non-empty destination folders.
        print(f"glmkit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
