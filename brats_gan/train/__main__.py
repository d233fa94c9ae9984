"""``python -m brats_gan.train``: the entry point the DeepSpeed launcher runs on every rank (command layer)."""

from brats_gan.commands.train import main

raise SystemExit(main())
