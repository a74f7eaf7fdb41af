"""`python -m reid_keras.export --model runs/x/best.keras [--out DIR]`: a SavedModel for serving.

Without `--out` it goes beside the model in its run folder (runs/x/export_best), or under
runs/export/<name> for a file outside a run folder: never the repository root.

`embed` takes raw uint8 images of any size and returns L2-normalised features; pair models (the
siamese and ID+verification families with a verification head) also get `verify`, P(same person).
The model's family is read from the run's config.json beside it (`--family` for a file outside a run
folder); the preprocessing likewise, else from the backbone's name. The model is read through
`reid_keras.models.loading.load_keras_model`: a damaged file, or NaN / inf weights (a diverged run),
end the command with exit code 2 and a message naming the file (and the first non-finite variable).
"""
from __future__ import annotations

import argparse
import os

from reid_keras.cli.arguments import RUNS, HelpFormatter, add_verbose_argument, model_name, run_folder_of


def _default_preprocessing(model_path: str, model) -> str:
    from reid_keras.models.backbones import BACKBONE_PREPROCESSING
    from reid_keras.models.loading import run_config_beside
    from reid_keras.models.saved_model import PREPROCESSING, ExportError

    value = run_config_beside(model_path).get("preprocessing")
    if isinstance(value, str):
        return value
    # The backbone sub-model keeps its keras.applications name (efficientnetb0, resnet50, vgg16).
    try:
        layers = model.get_layer("embedding").layers
    except (ValueError, AttributeError):
        layers = []  # no embedding sub-model: export_model names that problem
    for layer in layers:
        for backbone, preprocessing in BACKBONE_PREPROCESSING.items():
            if layer.name.startswith(backbone):
                return preprocessing
    raise ExportError(f"cannot tell the preprocessing of {model_path!r} (no run config.json beside it and no "
                      f"known backbone): pass --preprocessing, one of {', '.join(PREPROCESSING)}")


def _export_scene_model(parser, args, load_keras_model, run_config_beside) -> int:
    """A person-search model: its run's recipe (scene sides, preprocessing) shapes the `detect` and
    `embed_query` endpoints, so the run's config.json is required."""
    from reid_keras.families.config import config_from_json
    from reid_keras.models.loading import ModelLoadError

    data = run_config_beside(args.model)
    if not data:
        parser.error(f"--model {args.model!r}: a person-search model is exported with its run's scene sizes; "
                     "keep the run's config.json beside it")
    try:
        task = config_from_json(data, source=f"config.json beside {args.model}").task()
        model = load_keras_model(args.model)
        task.export(model, args.out)
    except ModelLoadError as err:
        parser.error(str(err))
    except ValueError as err:  # ExportError names the problem
        parser.error(f"--model {args.model!r}: {err}")
    print(f"exported {args.model} -> {args.out} (endpoints detect, embed_query)")
    return 0


def main(argv=None) -> int:
    from reid_keras.families import families, get_family, register_serializables
    from reid_keras.models.loading import ModelLoadError, inspect_model_path, load_keras_model, run_config_beside
    from reid_keras.models.saved_model import PREPROCESSING, export_model, read_metadata

    parser = argparse.ArgumentParser(prog="python -m reid_keras.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="trained model, a .keras file")
    parser.add_argument("--out", default=None, help="destination SavedModel folder, replaced atomically (default: "
                                                    "<run folder>/export_<model name>, else runs/export/<model name>)")
    parser.add_argument("--family", choices=sorted(families()), default=None,
                        help="the model's family (default: the run's config.json beside --model)")
    parser.add_argument("--preprocessing", choices=PREPROCESSING,
                        help="backbone preprocessing (default: the run's config.json, else the backbone's)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.out is None:
        run = run_folder_of(args.model)
        name = model_name(args.model)
        args.out = os.path.join(run, f"export_{name}") if run else os.path.join(RUNS, "export", name)
    try:
        if inspect_model_path(args.model) != "keras":
            raise ModelLoadError(f"--model {args.model!r} is an exported SavedModel folder already: pass the .keras "
                                 "file it was exported from")
    except ModelLoadError as err:
        parser.error(str(err))
    family_name = args.family or run_config_beside(args.model).get("family")
    if not family_name:
        parser.error(f"--model {args.model!r} is not in a run folder (no config.json beside it): pass --family, one "
                     f"of {', '.join(sorted(families()))}")
    family = get_family(family_name)
    register_serializables()
    if family.data == "scenes":
        return _export_scene_model(parser, args, load_keras_model, run_config_beside)
    try:
        model = load_keras_model(args.model)  # refuses NaN / inf weights, naming the first such variable
        preprocessing = args.preprocessing or _default_preprocessing(args.model, model)
        export_model(model, args.out, preprocessing=preprocessing, verifier=family.task.verifier(model))
    except ModelLoadError as err:  # names the file and what is wrong
        parser.error(str(err))
    except ValueError as err:  # ExportError, or a family's pair view refusing a model of another family
        parser.error(f"--model {args.model!r}: {err}")
    meta = read_metadata(args.out)
    print(f"exported {args.model} -> {args.out} (image_size {meta['image_size'][0]}x{meta['image_size'][1]}, "
          f"preprocessing {meta['preprocessing']}, {meta['feature_dim']}-d features, "
          f"{'embed only' if meta['head'] is None else meta['head'] + ' head'})")
    return 0
