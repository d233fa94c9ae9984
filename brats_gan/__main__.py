from brats_gan.commands import main

raise SystemExit(main())
