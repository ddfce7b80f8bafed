from fit3d_hf.commands.push import main

main()
