from brats_gan.cli import main

raise SystemExit(main())
