from mvtui.cli import main

raise SystemExit(main())
