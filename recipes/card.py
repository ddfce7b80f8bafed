from fit3d_hf.commands.card import main

main()
