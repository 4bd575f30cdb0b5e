"""``sklearn-crb migrate-model`` and ``migrate-data``: convert trusted outputs of release 0.1 into hashed ones.

``migrate-data``: a training set written before manifests (sklearn-crb 0.1)
has no hash that ties its basis and meta to its samples, so ``train`` refuses
it; :func:`sklearn_crb.io.manifest.migrate_dataset` writes a new file with
the same entries and a manifest. The old file is not changed.

Model folders written before format version 5 (sklearn-crb 0.1) carry no hash
that binds the meaning of ``model.json`` (``estimate``, ``tied_R1``,
``fill_values``...) to the weights, so ``fit --model`` refuses them. A user who
trusts such a folder converts it once (:func:`sklearn_crb.io.models.migrate_model`):
every check of the loader runs, and a *new* folder gets the same weights and
basis, byte for byte, with a hashed ``model.json``. The old folder is not changed.
"""

from __future__ import annotations

from sklearn_crb.cli._common import EPILOG, OVERWRITE_HELP
from sklearn_crb.io.manifest import migrate_dataset
from sklearn_crb.io.models import migrate_model

__all__ = ["cmd_migrate_model", "cmd_migrate_data", "add_parser"]


def cmd_migrate_model(args):
    out = migrate_model(args.model, args.out, overwrite=args.overwrite, argname="--out")
    if not args.quiet:
        print(f"migrated {args.model} -> {out} (hashed format; the old folder is unchanged)")
    return 0


def cmd_migrate_data(args):
    out = migrate_dataset(args.data, args.out, overwrite=args.overwrite, argname="--out")
    if not args.quiet:
        print(f"migrated {args.data} -> {out} (with a manifest; the old file is unchanged)")
    return 0


def add_parser(sub):
    p = sub.add_parser("migrate-model", epilog=EPILOG,
                       help="convert a trusted model folder of an older format (sklearn-crb 0.1) into the hashed one",
                       description="Check a model folder written before model.json was hashed (format version "
                                   "<= 4, sklearn-crb 0.1) with every check of the loader and write a new folder "
                                   "with the same weights and basis and a hashed model.json. Run it only on "
                                   "folders you trust: nothing in an old folder shows that its model.json belongs "
                                   "to its weights. The old folder is not changed.")
    p.add_argument("model", help="the old model folder")
    p.add_argument("--out", required=True, help="the new model folder (new, empty or a saved model)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_migrate_model)

    p = sub.add_parser("migrate-data", epilog=EPILOG,
                       help="add a manifest to a trusted training set of sklearn-crb 0.1 (a new file)",
                       description="Write a copy of a training set written before manifests (sklearn-crb 0.1) "
                                   "with a manifest that hashes its basis, meta and samples, so that train "
                                   "accepts it. Run it only on sets you trust. The old file is not changed.")
    p.add_argument("data", help="the old training set (.npz, .h5 or .hdf5)")
    p.add_argument("--out", required=True, help="the new training set (same suffix)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_migrate_data)
