from fit3d_hf.commands.finetune import main

main()
