"""Every output says what it is: the AI-generated label (metadata), signed C2PA content credentials and the
invisible watermark. A core stage (it needs only ``files``), so generation, pseudo-triplets and the app all use it."""
