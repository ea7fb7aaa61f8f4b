"""The emoji world `mini` is pretrained on: emoji packs, the scene generator, the shipped subject datasets and the
pretraining recipe (the model's architecture itself is boothkit.models.mini)."""
