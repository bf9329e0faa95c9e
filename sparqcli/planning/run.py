"""`sparqcli.plan`: read, select, measure every candidate of every table, allocate, verify."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli.compression import input_paths, read_config
from sparqcli.config import Config, Rule, config_files
from sparqcli.errors import InputError, UnfitSettingsError, UsageError
from sparqcli.parallel import resolve_threads
from sparqcli.planning.result import ModelPoint, PlanResult, TablePlan, model_error
from sparqcli.planning.search import Allocator
from sparqcli.planning.space import Candidate, PlanSpace, candidates
from sparqcli.select import exact_pattern
from sparqcli.settings import finite_number, show_value

if TYPE_CHECKING:
    import torch

    from sparqcli.planning.measure import Option

ProgressCallback = Callable[[str, float], None]
"""Called with a description (`model.pt: emb.weight`) and the fraction of that table done."""

MIN_SAMPLE_ROWS = 512
"""A sampled table's error is estimated on at least this many rows."""
SAMPLE_PASSES = 2
"""Above the minimum, a table's sample is `rows * SAMPLE_PASSES / candidates` rows: sized when
each candidate was one engine run on the sample, so that all of them cost about this many runs
over the table; computed in batches they cost far less (docs/PLAN.md, "Cost")."""
SAMPLE_FRACTION = 64
"""Below `MIN_SAMPLE_ROWS`, a table's sample is one row in this many, and at least
`SMALL_SAMPLE_ROWS`: on small tables the sample's fixed size would cost more than the table."""
SMALL_SAMPLE_ROWS = 128
_VERIFY_ROUNDS = 10
"""Verification rounds before the choice is made among measured options only. A round that does
not keep its choice has measured options it had not (they are finite), and a round costs one
engine run per table whose choice moved; a row-cosine gate, whose sampled estimate can be
optimistic, may rule out one chosen option after another: 6 rounds for a budget that 3 rounds
refused (naming 88,656 bytes where a 75,418-byte plan met it; found by a bug hunt)."""


def default_sample_rows(rows: int, n_candidates: int) -> int:
    """Returns the rows a table's errors are estimated on by default (docs/PLAN.md, "Cost")."""
    floor = min(MIN_SAMPLE_ROWS, max(SMALL_SAMPLE_ROWS, -(-rows // SAMPLE_FRACTION)))
    return max(floor, math.ceil(rows * SAMPLE_PASSES / max(1, n_candidates)))


def plan(
    inputs: str | Path | Sequence[str | Path],
    config: Config | str | Path,
    *,
    budget: float | None = None,
    max_error: float | None = None,
    row_weights: str | Path | None = None,
    output: str | Path | None = None,
    force: bool = False,
    overrides: Sequence[str] = (),
    trust_pickle: bool = False,
    key: str | None = None,
    sample_rows: int | None = None,
    verify: bool = True,
    progress: ProgressCallback | None = None,
) -> PlanResult:
    """Chooses every selected table's settings for a byte budget or an error target.

    `config` (a Config or a YAML path, with `overrides`) selects the tables; its `plan:` section
    narrows the candidates. Give exactly one of `budget` (compressed bytes <= budget x the
    tables' original bytes; least error) or `max_error` (model error E <= max_error; fewest
    bytes). `row_weights` names a safetensors file with one non-negative weight per row of each
    selected table (keyed by table key). Tables of more than twice `sample_rows` rows (default:
    sized by the number of candidates, at least 512) are estimated on a row sample; with
    `verify` the chosen settings of sampled tables are then measured on the whole table, so the
    reported numbers are what `sparq compress` gives. With `output`, the plan's YAML is written
    there (checked before any work; replaced only with `force`).
    Returns the PlanResult. Raises UsageError for a missing or impossible target (naming the
    best reachable value), ConfigError/SelectionError for a config that does not fit,
    InputError for unreadable inputs or weights, TableError for NaN/Inf values.
    """
    started = time.perf_counter()
    mode, target = _target(budget, max_error)
    sources = input_paths(inputs)
    if sample_rows is not None and (
        isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1
    ):
        raise UsageError(f"{{opt:sample_rows}}: must be a positive integer, got {sample_rows!r}")
    inputs = plan_inputs(sources, config, row_weights)
    config = read_config(config, overrides)
    if output is not None:
        from sparqcli.sinks import check_output_path

        check_output_path(Path(output), inputs, force)

    from sparqcli.aliasing import select_with_aliases
    from sparqcli.dtypes import torch_dtype
    from sparqcli.planning.measure import measure_exact, measure_table
    from sparqcli.sources import open_checkpoint

    space = config.plan or PlanSpace({})
    opened = []
    seen: dict[str, Path] = {}
    aliases: dict[str, tuple[str, ...]] = {}  # a tied table: its other keys
    for source in sources:
        checkpoint = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
        if checkpoint.is_sparq:
            raise UsageError(
                f"{source}: is already compressed by sparq; plan on the original checkpoint",
                path=source,
            )
        # tied tables are one table, compressed and stored once, as compress stores them
        selection, table_aliases = select_with_aliases(config, checkpoint, checkpoint.name)
        aliases.update(table_aliases)
        for selected in selection.tables:
            if selected.key in seen:
                raise UsageError(
                    f"{source}: table '{selected.key}' is also in {seen[selected.key]}; a plan "
                    "gives each key one setting, so plan these checkpoints one at a time",
                    path=source,
                )
            seen[selected.key] = source
        _check_keys(source, checkpoint.tensors, selection.tables, table_aliases)
        opened.append((checkpoint, selection))
    weights = _load_weights(row_weights, [t for _, s in opened for t in s.tables], aliases)

    tables: list[TablePlan] = []
    measured: list[list[Option]] = []
    readers: list[Any] = []
    # Tables of the same base rule share one candidate list (608 candidates by default).
    made: dict[tuple[Any, ...], list[Candidate]] = {}
    for checkpoint, selection in opened:
        for selected in selection.tables:
            rows, cols = selected.info.shape
            rule = selected.rule
            made_key = (rule.sparsity, rule.quantization)
            if made_key not in made:
                made[made_key] = candidates(space, rule.sparsity, rule.quantization)
            table_candidates = made[made_key]
            wanted = sample_rows or default_sample_rows(rows, len(table_candidates))
            row_weight = weights.get(selected.key)
            label = f"{Path(checkpoint.name).name}: {selected.key}"
            name = f"{checkpoint.name}: {selected.key}"
            with checkpoint.row_reader(selected.key) as read_rows:
                options = measure_table(
                    read_rows,
                    (rows, cols),
                    torch_dtype(selected.info.dtype),
                    config.order,
                    table_candidates,
                    weights=row_weight,
                    sample_rows=wanted,
                    name=name,
                    progress=None if progress is None else _labelled(progress, label),
                )
            total_weight = float(row_weight.double().sum()) if row_weight is not None else rows
            tables.append(
                TablePlan(
                    key=selected.key,
                    source=checkpoint.name,
                    shape=(rows, cols),
                    dtype=selected.info.dtype,
                    rule=rule,
                    bytes_before=selected.info.nbytes,
                    weight=cols * total_weight,
                    options=options,
                    frontier=[],
                    chosen=0,
                    sampled_rows=None if 2 * wanted >= rows else wanted,
                )
            )
            measured.append(options)
            readers.append((checkpoint, selected, row_weight))

    allowed = _allowed_everywhere(tables)

    # Verification runs are compressions: with the thread count `sparq compress` takes.
    threads, _ = resolve_threads()

    def verify_choice(t: int, index: int) -> Option:
        checkpoint, selected, row_weight = readers[t]
        name = f"{checkpoint.name}: {selected.key}"
        estimate = tables[t].options[index]
        try:
            with checkpoint.row_reader(selected.key) as read_rows:
                return measure_exact(
                    read_rows,
                    tables[t].shape,
                    torch_dtype(selected.info.dtype),
                    config.order,
                    estimate.candidate,
                    weights=row_weight,
                    name=name,
                    threads=threads,
                )
        except UnfitSettingsError as error:  # a row the sample did not hold: never chosen
            reason = str(error).removeprefix(f"{name}: ")
            return replace(estimate, exact=True, refused=reason)

    try:
        choice = _allocate(tables, allowed, mode, target)
    except _UnreachableTarget:
        if not verify:
            raise
        # The samples' estimates reach no plan: the value the error names is measured exactly
        # (and a plan the estimates missed is found).
        choice = _exact_choice(tables, mode, target, verify_choice)
    if verify:
        choice = _verified_choice(tables, choice, mode, target, verify_choice)
        allowed = [_allowed(table) for table in tables]
    for table, index, indices in zip(tables, choice, allowed, strict=True):
        table.chosen = index
        table.frontier = _frontier(table, indices)

    frontier, uniform, best_uniform = _model_points(tables, allowed, mode, target)
    result = PlanResult(
        inputs=sources,
        base=config,
        mode=mode,
        target=target,
        tables=tables,
        frontier=frontier,
        uniform=uniform,
        best_uniform=best_uniform,
        weighted=row_weights is not None,
        verified=verify,
    )
    result.config = _plan_config(config, tables)
    result.seconds = time.perf_counter() - started
    if output is not None:
        result.save(output, force=force)
    return result


def plan_inputs(
    sources: Sequence[Path], config: Config | str | Path, row_weights: str | Path | None
) -> list[Path]:
    """Returns the files a plan reads (its checkpoints, its config's YAML file, its row
    weights): no output of the plan, nor its plot, may overwrite them."""
    return [*sources, *config_files(config), *([Path(row_weights)] if row_weights else [])]


def _verified_choice(
    tables: list[TablePlan],
    choice: list[int],
    mode: str,
    target: float,
    verify_choice: Callable[[int, int], Option],
) -> list[int]:
    """Returns a choice of options all measured on their whole tables that passes every table's
    gates and meets the target with those exact figures, starting from `choice`.

    The chosen estimates are replaced by exact measurements and the allocation runs again with
    them, until it keeps its choice (at most `_VERIFY_ROUNDS` times). A choice still moving then
    is made among the exactly measured options, after measuring each table's option that the
    target needs most (its fewest bytes for a budget, its least error for an error target), so
    that a plan is found wherever the measurements allow one. Raises UsageError where, with
    what is known, a table has no option within its gates or no plan meets the target.
    """
    for _ in range(_VERIFY_ROUNDS):
        _verify(tables, choice, verify_choice)
        new_choice = _allocate(tables, _allowed_everywhere(tables), mode, target)
        if new_choice == choice:
            return choice
        choice = new_choice
    _verify(tables, choice, verify_choice)
    return _exact_choice(tables, mode, target, verify_choice)


_EXACT_EXTREMES = 3
"""How many of each table's options the target needs most `_exact_choice` measures."""


def _exact_choice(
    tables: list[TablePlan],
    mode: str,
    target: float,
    verify_choice: Callable[[int, int], Option],
) -> list[int]:
    """Returns a choice among the options measured on their whole tables, after measuring each
    table's `_EXACT_EXTREMES` options that the target needs most (the fewest bytes for a budget,
    the least error for an error target, by the estimates) and the best uniform setting's.
    Raises UsageError where, with what is known, a table has no option within its gates or no
    plan meets the target."""
    allowed = _allowed_everywhere(tables)

    def need(option: Option) -> tuple[float, float]:
        figures = (option.bytes, option.weighted_error)
        return figures if mode == "budget" else figures[::-1]

    # each table's few options the target needs most: their estimates tie or miss (three
    # options estimated alike can measure 0.0032 and 0.0045), so one is not enough
    extremes = [
        sorted(indices, key=lambda i, t=t: need(t.options[i]))[:_EXACT_EXTREMES]
        for t, indices in zip(tables, allowed, strict=True)
    ]
    for rank in range(_EXACT_EXTREMES):
        _verify(tables, [most[min(rank, len(most) - 1)] for most in extremes], verify_choice)
    # and the best uniform setting by the estimates: the plan is never worse than its figures
    allowed = _allowed_everywhere(tables)  # the extremes' measurements may refuse or gate them
    allocator = Allocator([_points(t, a) for t, a in zip(tables, allowed, strict=True)])
    seed = _uniform_seed(tables, allowed, allocator, mode, target)
    if seed is not None:
        _verify(tables, [allowed[t][p] for t, p in enumerate(seed)], verify_choice)
    exact = [[i for i in _allowed(t) if t.options[i].exact] for t in tables]
    for table, indices in zip(tables, exact, strict=True):
        if not indices:
            raise UsageError(
                f"{table.source}: table '{table.key}': none of the settings measured on the "
                f"whole table passes the gates of {table.rule.label} (the samples' estimates of "
                "others do); plan with a larger sample"
            )
    scope = f"{_within(tables, _allowed_everywhere(tables))}, measured on the whole tables,"
    return _allocate(tables, exact, mode, target, within=scope)


def _verify(
    tables: list[TablePlan], choice: list[int], verify_choice: Callable[[int, int], Option]
) -> None:
    """Replaces the chosen options that are estimates by their measurements on the whole table."""
    for t, index in enumerate(choice):
        if not tables[t].options[index].exact:
            tables[t].options[index] = verify_choice(t, index)


def _allowed_everywhere(tables: list[TablePlan]) -> list[list[int]]:
    """Returns every table's options within its gates. Raises UsageError for a table with none."""
    allowed = [_allowed(table) for table in tables]
    for table, indices in zip(tables, allowed, strict=True):
        if not indices:
            raise UsageError(_no_candidate(table))
    return allowed


def _target(budget: float | None, max_error: float | None) -> tuple[str, float]:
    if (budget is None) == (max_error is None):
        raise UsageError(
            "give one target: {opt:budget} (a bytes ratio) or {opt:max_error} (an error E)",
            option="budget",
        )
    name, value = ("budget", budget) if budget is not None else ("max_error", max_error)
    number = finite_number(value)
    if number is None:
        raise UsageError(
            f"{{opt:{name}}}: must be a finite number, got {show_value(value)}", option=name
        )
    if number <= 0:
        raise UsageError(f"{{opt:{name}}}: must be > 0, got {number:g}", option=name)
    return name, number


def _labelled(progress: ProgressCallback, label: str) -> Callable[[float], None]:
    return lambda done: progress(label, done)


def _allowed(table: TablePlan) -> list[int]:
    """Returns the indices of the options the engine accepts that pass the table's gates."""
    gates = table.rule.gates
    allowed = []
    for index, option in enumerate(table.options):
        if option.refused is not None:
            continue
        ratio = option.bytes / table.bytes_before if table.bytes_before else None
        if not gates.failures(option.rel_error, option.row_cosine_min, ratio):
            allowed.append(index)
    return allowed


def _no_candidate(table: TablePlan) -> str:
    fitting = [option for option in table.options if option.refused is None]
    if not fitting:
        return (
            f"{table.source}: table '{table.key}': the engine refuses every candidate of "
            f"{table.rule.label}; the first: {table.options[0].candidate.label}: "
            f"{table.options[0].refused}"
        )
    best = min(fitting, key=lambda o: (o.rel_error, o.bytes))
    gates = ", ".join(f"{k} {v:g}" for k, v in table.rule.gates.to_dict().items() if v is not None)
    ratio = best.bytes / table.bytes_before if table.bytes_before else 0.0
    return (
        f"{table.source}: table '{table.key}': no candidate passes the gates of "
        f"{table.rule.label} ({gates}); the most accurate ({best.candidate.label}) gives "
        f"rel_error {best.rel_error:.4g}, row_cosine_min {best.row_cosine_min:.6g}, "
        f"bytes_ratio {ratio:.4g}"
    )


def _points(table: TablePlan, indices: list[int]) -> list[tuple[int, float]]:
    return [
        (table.options[i].bytes, table.weight * table.options[i].weighted_error ** 2)
        for i in indices
    ]


def _check_keys(
    source: Path,
    tensors: Any,
    selected: Sequence[Any],
    aliases: dict[str, tuple[str, ...]],
) -> None:
    """Raises UsageError where a sparq file cannot hold the selected tables beside the
    checkpoint's other keys (`format.spec.checkpoint_collision`, as `sparq compress` checks it):
    a plan of them could not be compressed to the sparq format (the torch-ao format could hold
    them, but a plan is made for either)."""
    from sparqcli.format.spec import checkpoint_collision

    table_keys = {table.key: table for table in selected}
    alias_keys = {alias for table in selected for alias in aliases.get(table.key, ())}
    collision = checkpoint_collision(tensors, table_keys, alias_keys)
    if collision is not None:
        raise UsageError(
            f"{source}: a sparq file cannot hold the selected tables: {collision}; leave one "
            "out of the selection",
            path=source,
        )


class _UnreachableTarget(UsageError):
    """No plan among the options given meets the target (the message names the best value)."""


def _rounded_up(value: float) -> str:
    """Returns a positive `value` with 4 significant digits, rounded up: a target set to the
    printed value is met."""
    text = f"{value:.4g}"
    if not math.isfinite(value) or value <= 0 or float(text) >= value:
        return text
    digits = 3 - math.floor(math.log10(value))  # decimals of the 4th significant digit
    rounded = math.ceil(value * 10.0**digits) / 10.0**digits
    while float(f"{rounded:.4g}") < value:  # value * 10**digits rounded to a whole number
        rounded += 10.0**-digits
    return f"{rounded:.4g}"


def _allocate(
    tables: list[TablePlan],
    allowed: list[list[int]],
    mode: str,
    target: float,
    within: str | None = None,
) -> list[int]:
    """Returns the chosen option index of every table. Raises UsageError when unreachable,
    naming the best reachable value `within` the options given (default: `_within`'s words)."""
    allocator = Allocator([_points(t, a) for t, a in zip(tables, allowed, strict=True)])
    scope = within if within is not None else _within(tables, allowed)
    total_weight = sum(t.weight for t in tables)
    # the best uniform setting that meets the target starts a local search too: never worse
    seed = _uniform_seed(tables, allowed, allocator, mode, target)
    seeds = [] if seed is None else [seed]
    limit = _limit(tables, mode, target)
    if mode == "budget":
        before = sum(t.bytes_before for t in tables)
        found = allocator.for_budget(int(limit), seeds)
        if found is None:
            smallest = allocator.totals(allocator.cheapest())[0]
            raise _UnreachableTarget(
                f"{{opt:budget}} {target:g} cannot be met: the smallest plan{scope} "
                f"takes {smallest:,} bytes, {_rounded_up(smallest / before)}x of the tables' "
                f"{before:,} bytes",
                option="budget",
            )
    else:
        found = allocator.for_cost(limit, seeds)
        if found is None:
            lowest = allocator.totals(allocator.most_accurate())[1]
            best = math.sqrt(lowest / total_weight) if total_weight else 0.0
            raise _UnreachableTarget(
                f"{{opt:max_error}} {target:g} cannot be reached: the lowest error any plan"
                f"{scope} reaches is {_rounded_up(best)} (every table at its most "
                "accurate setting)",
                option="max_error",
            )
    return [allowed[t][i] for t, i in enumerate(found)]


def _uniform_seed(
    tables: list[TablePlan],
    allowed: list[list[int]],
    allocator: Allocator,
    mode: str,
    target: float,
) -> list[int] | None:
    """Returns the best uniform setting that meets the target by `allocator`'s figures (fewest
    bytes for an error target, least error for a budget) as positions in `allowed`, or None."""
    uniform = [seed for _, seed in _uniform_choices(tables, allowed)]
    limit = _limit(tables, mode, target)
    if mode == "budget":
        fitting = [s for s in uniform if allocator.totals(s)[0] <= limit]
        return min(fitting, key=lambda s: allocator.totals(s)[::-1]) if fitting else None
    fitting = [s for s in uniform if allocator.totals(s)[1] <= limit]
    return min(fitting, key=lambda s: allocator.totals(s)) if fitting else None


def _limit(tables: list[TablePlan], mode: str, target: float) -> float:
    """Returns the target in the allocator's terms: the most bytes for a budget, the most cost
    (Σ weight · error², E² times the total weight) for an error target."""
    # (1 + 1e-12): a target printed from an exact ratio or error (`_rounded_up`) is met, where
    # the product's rounding would put it an ulp below
    if mode == "budget":
        return math.floor(target * sum(t.bytes_before for t in tables) * (1 + 1e-12))
    return target * target * sum(t.weight for t in tables) * (1 + 1e-12)


def _within(tables: list[TablePlan], allowed: list[list[int]]) -> str:
    """Returns what ruled options out, where something did: ` within the gates` (the base
    rules' gates), ` among the settings the engine accepts` (refused ones), or both."""
    gated = refused = False
    for table, indices in zip(tables, allowed, strict=True):
        fitting = sum(option.refused is None for option in table.options)
        refused = refused or fitting < len(table.options)
        gated = gated or len(indices) < fitting
    if gated and refused:
        return " within the gates, among the settings the engine accepts"
    if refused:
        return " among the settings the engine accepts"
    return " within the gates" if gated else ""


def _uniform_choices(
    tables: list[TablePlan], allowed: list[list[int]]
) -> list[tuple[str, list[int]]]:
    """Returns every setting that every table has (after gates), as per-table positions in
    `allowed`, labelled; in the first table's candidate order."""
    positions = []
    for table, indices in zip(tables, allowed, strict=True):
        positions.append({table.options[i].candidate.uniform_key: p for p, i in enumerate(indices)})
    found = []
    first = tables[0]
    for index in allowed[0]:
        key = first.options[index].candidate.uniform_key
        if all(key in by_key for by_key in positions):
            found.append((first.options[index].candidate.label, [p[key] for p in positions]))
    return found


def _frontier(table: TablePlan, indices: list[int]) -> list[int]:
    from sparqcli.planning.search import pareto

    points = _points(table, indices)
    return [indices[i] for i in pareto(points)]


def _model_points(
    tables: list[TablePlan], allowed: list[list[int]], mode: str, target: float
) -> tuple[list[ModelPoint], list[ModelPoint], ModelPoint | None]:
    """Returns the model's frontier, every uniform setting, and the best uniform one."""
    allocator = Allocator([_points(t, a) for t, a in zip(tables, allowed, strict=True)])
    total_weight = sum(t.weight for t in tables) or 1.0
    frontier = [
        ModelPoint(
            "frontier",
            step.bytes,
            math.sqrt(max(0.0, step.cost) / total_weight),
            all(
                t.options[a[i]].exact for t, a, i in zip(tables, allowed, step.choice, strict=True)
            ),
        )
        for step in allocator.path()
    ]
    uniform = []
    for label, positions in _uniform_choices(tables, allowed):
        options = [t.options[a[p]] for t, a, p in zip(tables, allowed, positions, strict=True)]
        error = model_error(
            [(t.weight, o.weighted_error) for t, o in zip(tables, options, strict=True)]
        )
        exact = all(o.exact for o in options)
        uniform.append(ModelPoint(label, sum(o.bytes for o in options), error, exact))
    before = sum(t.bytes_before for t in tables)
    if mode == "budget":
        fitting = [p for p in uniform if p.bytes <= target * before]
        best = min(fitting, key=lambda p: (p.error, p.bytes), default=None)
    else:
        fitting = [p for p in uniform if p.error <= target]
        best = min(fitting, key=lambda p: (p.bytes, p.error), default=None)
    return frontier, uniform, best


def _plan_config(base: Config, tables: list[TablePlan]) -> Config:
    """Returns the plan as a config: the base's order and defaults, one rule per table, no
    size threshold."""
    rules = []
    for table in tables:
        gates = table.rule.gates
        has_gates = any(value is not None for value in gates.to_dict().values())
        rules.append(
            Rule(
                match=exact_pattern(table.key),
                sparsity=_as_rule_section(table.option.candidate.sparsity.to_dict()),
                quantization=_as_rule_section(table.option.candidate.quantization.to_dict()),
                gates=_as_rule_section(gates.to_dict()) if has_gates else None,
            )
        )
    return Config(
        layers=rules,
        order=base.order,
        sparsity=base.sparsity,
        quantization=base.quantization,
        # every rule names one planned table; a key with glob characters is a regex rule,
        # which a threshold would skip when small
        min_table_bytes=0,
        source="<plan>",
    )


def _as_rule_section(values: dict[str, Any]) -> dict[str, Any]:
    """Returns a section as a rule holds it when read from YAML (block shapes as tuples)."""
    return {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}


def _one_per_row(weights: torch.Tensor) -> torch.Tensor:
    """Returns row weights saved as a (rows, 1) column as (rows,); others unchanged."""
    return weights[:, 0] if weights.dim() == 2 and weights.shape[1] == 1 else weights


def _load_weights(
    path: str | Path | None, selected: list[Any], aliases: dict[str, tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    """Returns each selected table's row weights from a safetensors file (empty without one).

    A table's weights are under its key or its module's name; a tied table's (`aliases`: its
    other keys) under any of its keys, the first of them in that order (its other keys, if
    present, must hold the same weights).

    Raises InputError for an unreadable file and UsageError for missing, misshapen, negative or
    non-finite weights, naming the file and the key.
    """
    if path is None:
        return {}
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{{opt:row_weights}} {path}: no such file", path=path)
    try:
        with safe_open(str(path), framework="pt") as file:
            available = list(file.keys())
            found = {}
            for table in selected:
                keys = (table.key, *aliases.get(table.key, ()))
                names = [n for k in keys for n in (k, k.rpartition(".")[0]) if n in available]
                name = names[0] if names else None
                if name is None:
                    raise UsageError(
                        f"{path}: no row weights for table '{table.key}' "
                        f"(the file holds {', '.join(available[:5]) or 'no tensors'})",
                        path=path,
                    )
                tensor = file.get_tensor(name)
                # a tied table's weights under several of its keys (not module names) must agree
                for other in (k for k in keys if k in available and k != name):
                    if not torch.equal(_one_per_row(file.get_tensor(other)), _one_per_row(tensor)):
                        raise UsageError(
                            f"{path}: '{name}' and '{other}' hold different row weights for one "
                            f"tied table ('{table.key}'); keep one of them",
                            path=path,
                        )
                found[table.key] = (name, tensor)
    except UsageError:
        raise
    except Exception as error:  # safetensors raises several kinds for a corrupt file
        raise InputError(f"{path}: cannot read row weights: {error}", path=path) from None
    weights = {}
    for table in selected:
        name, tensor = found[table.key]
        rows = table.info.shape[0]
        tensor = _one_per_row(tensor)
        if tensor.dtype == torch.bool or tensor.is_complex():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise UsageError(f"{path}: '{name}' must hold real numbers, got {dtype}", path=path)
        if tensor.dim() != 1 or tensor.shape[0] != rows:
            raise UsageError(
                f"{path}: '{name}' must hold one weight per row of '{table.key}' ({rows}), "
                f"got shape {list(tensor.shape)}",
                path=path,
            )
        tensor = tensor.double()
        if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
            raise UsageError(f"{path}: '{name}' holds negative, NaN or Inf weights", path=path)
        if not bool((tensor > 0).any()):
            raise UsageError(f"{path}: '{name}': every weight is 0", path=path)
        weights[table.key] = tensor
    # The plan depends on the weights' ratios only (E and each table's weighted error are
    # ratios of weighted sums): scaled by their largest, their sums cannot overflow.
    largest = max(float(tensor.max()) for tensor in weights.values())
    return {key: tensor / largest for key, tensor in weights.items()}
