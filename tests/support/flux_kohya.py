"""diffusers' kohya Flux converter at another model's widths (tests of exports from small Flux transformers)."""
import inspect


def flux_converter(dims):
    """diffusers' `_convert_kohya_flux_lora_to_diffusers`, unchanged but for the single blocks' linear1 widths,
    which it hard-codes as Flux.1-dev's [3072]*3 + [12288]: the small test models are narrower."""
    from diffusers.loaders import lora_conversion_utils as L

    src = inspect.getsource(L._convert_kohya_flux_lora_to_diffusers)
    assert src.count("dims=[3072, 3072, 3072, 12288]") == 1  # fails loudly if diffusers changes the function
    namespace = dict(vars(L))
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", f"dims={dims}"), namespace)
    return namespace["_convert_kohya_flux_lora_to_diffusers"]
