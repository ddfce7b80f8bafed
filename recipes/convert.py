from fit3d_hf.commands.convert import main

main()
