"""k5core: the Kandinsky 5 engine (pure torch; imports nothing from ComfyUI, nodes/ or trainer/)."""
