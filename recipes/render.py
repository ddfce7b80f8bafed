from fit3d_hf.commands.render import main

main()
