"""PEFT prefix tuning with transformers 5: a generate() fix, shared by the tests' PEFT oracle
and benchmarks/bench_e2e.py."""


def fix_peft_generate(peft_model) -> None:
    """Make PEFT's generate use its prefix with transformers 5.

    PEFT (0.21) hands its prefix cache to the model as `past_key_values`, but transformers 5's
    generate passes its own (empty) cache as `cache`, which wins: PEFT's greedy generation then
    silently runs without the prefix (the positions stay shifted). This moves PEFT's prefix
    cache to `cache` on the prefill step, and shows PEFT the filled cache under the name it
    looks for on later steps (else it rebuilds its prefix every step, only for it to be
    dropped): what PEFT intends. forward() is unaffected.
    """
    base_prepare = peft_model.base_model_prepare_inputs_for_generation

    def base_prepare_inputs_for_generation(*args, **kwargs):
        inputs = base_prepare(*args, **kwargs)
        cache = inputs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            # where PEFT looks for the cache: found, it does not rebuild its prefix every step
            inputs["past_key_values"] = cache
        return inputs

    peft_model.base_model_prepare_inputs_for_generation = base_prepare_inputs_for_generation
    original = peft_model.prepare_inputs_for_generation

    def prepare_inputs_for_generation(*args, **kwargs):
        inputs = original(*args, **kwargs)
        prefix_cache = inputs.pop("past_key_values", None)
        cache = inputs.get("cache")
        if prefix_cache is not None and (cache is None or cache.get_seq_length() == 0):
            inputs["cache"] = prefix_cache
        return inputs

    peft_model.prepare_inputs_for_generation = prepare_inputs_for_generation
