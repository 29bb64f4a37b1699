"""The models of the harness, one surface for all (docs/method.md sections 3-4 and 7).

- `base`: the shared surface (`RetrievalModel`, `GraphModel` protocols), `ModelOutput`, `Projection`, chunked embedding;
- `layers`: the graph layers (`AlignedGATv2Conv`, `GraphLayer`);
- `dcmfg`: the DCMFG model;
- `baselines`: linear, DCMH-style and DCMHT-style baselines;
- `registry`: models by name (`create_model`).

Nothing is imported here, so `dcmfg.models.registry` stays free of model code until a model is built.
"""
