"""How optimum-rom plugs into transformers (loading/saving), PEFT (LoRA) and optimum-cli."""
