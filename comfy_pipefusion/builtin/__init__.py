"""The built-in trained model ("shapes"): a small Flux-architecture DiT trained on procedurally drawn scenes.

    scenes     the data recipe: captions and the pictures drawn for them (no download)
    latent     the model's own latent format: pixels folded into channels, and its decode
    text       the tiny text embedding that ships inside the checkpoint (caption -> conditioning)
    model      the architecture, where the committed weights live, and loading them for training or sampling
    judge      a small classifier of the scene's attributes, trained with the model, and pixel metrics

``tools/train_builtin.py`` trains the model (and the judge) from a seed with one command.
"""
