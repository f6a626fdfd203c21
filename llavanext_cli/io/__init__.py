"""What the tool reads and writes: the inputs (IMAGES arguments, images, URLs), the settings and the files the user
names, the records and their formats, the training-set outputs, and the shards of a data-parallel run. Imports
nothing from the layers above (model, engine, api, cli)."""
