from meshllm.cli import main

raise SystemExit(main())
