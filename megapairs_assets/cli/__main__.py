from megapairs_assets.cli.main import main

raise SystemExit(main())
