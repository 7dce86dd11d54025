from orpo_demo.run import main

main()
