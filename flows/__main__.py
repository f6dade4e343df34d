from modelferry.flows.cli import main

raise SystemExit(main())
