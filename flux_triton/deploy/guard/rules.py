"""Each served model's own limits, applied by the guard: a request that a model would refuse for its inputs' names,
datatypes or shapes (batch, image tokens ``N``, text tokens ``S``, the widths ``C``, ``P``, ``D``) is refused before
it reaches tritonserver, and a body may be no larger than the model's largest valid request.

The rules come from the models' configs as tritonserver serves them (``dit_transformer``'s limits are its
``max_image_tokens`` and ``max_text_tokens`` parameters, an ensemble's those of its first step, ``dit_preprocess``),
read once per model; the contract's specs say which dimension is ``N`` and which ``S``."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from flux_triton.contract.specs import INPUT_BY_NAME
from flux_triton.deploy.guard.checks import ELEMENT_BYTES, InferSummary, Refused

HEADER_ALLOWANCE = 64 << 10  # bytes of JSON header and framing beside the tensors of a request
BOUND_PARAMETERS = {"N": "max_image_tokens", "S": "max_text_tokens"}

Dim = int | str  # a fixed size, or a contract symbol


@dataclass(frozen=True)
class ModelRules:
    model: str
    inputs: Mapping[str, tuple[str, tuple[Dim, ...]]]  # name -> datatype and per-sample dims
    max_batch: int
    bounds: Mapping[str, int]  # the largest size of each symbol the model serves

    @classmethod
    def from_config(cls, config: Mapping, limits_from: Mapping | None = None) -> ModelRules | None:
        """The rules of a batching model's config; ``limits_from``: the config whose parameters hold its limits
        (an ensemble's first step). ``None`` for a model without a batch dimension."""
        if not config.get("max_batch_size"):
            return None
        parameters = {**(limits_from or {}).get("parameters", {}), **config.get("parameters", {})}
        bounds = {symbol: int(parameters[name]["string_value"]) for symbol, name in BOUND_PARAMETERS.items()
                  if name in parameters}  # fmt: skip
        inputs = {}
        for entry in config.get("input", []):
            spec = INPUT_BY_NAME.get(entry["name"])
            dims = []
            for index, size in enumerate(int(d) for d in entry["dims"]):
                symbol = spec.dims[index] if spec is not None and index < len(spec.dims) else "?"
                dims.append(size if size >= 0 else symbol)
            inputs[entry["name"]] = (entry["data_type"].removeprefix("TYPE_"), tuple(dims))
        return cls(config["name"], inputs, int(config["max_batch_size"]), bounds)

    def max_body_bytes(self) -> int | None:
        """The body of the model's largest valid request (``None``: a dimension without a bound)."""
        total = 0
        for datatype, dims in self.inputs.values():
            sizes = [d if isinstance(d, int) else self.bounds.get(d) for d in dims]
            if None in sizes or datatype not in ELEMENT_BYTES:
                return None
            total += self.max_batch * math.prod(sizes) * ELEMENT_BYTES[datatype]
        return total + HEADER_ALLOWANCE

    def check(self, summary: InferSummary) -> None:
        """Refuse an input the model does not take, or a shape outside what it serves, naming the input."""
        seen: dict[str, tuple[int, str]] = {}  # symbol (and the batch) -> size and the input it came from
        for name, datatype, shape in summary.inputs:
            if name not in self.inputs:
                raise Refused(f"input '{name}': model '{self.model}' takes no such input (it takes "
                              f"{', '.join(self.inputs)})")  # fmt: skip
            wanted, dims = self.inputs[name]
            if datatype != wanted:
                raise Refused(f"{name}: expected dtype {wanted}, got {datatype}")
            if len(shape) != len(dims) + 1:
                raise Refused(f"{name}: expected rank {len(dims) + 1}, got shape {shape}")
            if shape[0] > self.max_batch:
                raise Refused(f"{name}: batch {shape[0]} exceeds this server's limit of {self.max_batch}")
            for symbol, size in zip(("B", *dims), shape, strict=True):
                if isinstance(symbol, int):
                    if size != symbol:
                        raise Refused(f"{name}: expected shape [B, {', '.join(map(str, dims))}], got {shape}")
                    continue
                if symbol in self.bounds and size > self.bounds[symbol]:
                    raise Refused(f"{name}: {symbol}={size} exceeds this server's limit of {self.bounds[symbol]}")
                if symbol in seen and seen[symbol][0] != size:
                    raise Refused(f"{name}: {symbol}={size} disagrees with {seen[symbol][1]}'s {seen[symbol][0]}")
                seen.setdefault(symbol, (size, name))


class RulesCache:
    """Each model's rules, read from its config (``fetch_config``: the served config, or ``None`` while the model
    is not loaded) the first time a request names it."""

    def __init__(self, fetch_config: Callable[[str], Awaitable[Mapping | None]]):
        self._fetch = fetch_config
        self._rules: dict[str, ModelRules | None] = {}

    async def get(self, model: str) -> ModelRules | None:
        if model not in self._rules:
            config = await self._fetch(model)
            if config is None:  # not loaded (yet): the next request asks again
                return None
            limits_from = None
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            if steps:
                limits_from = await self._fetch(steps[0]["model_name"])
            self._rules[model] = ModelRules.from_config(config, limits_from)
        return self._rules[model]
