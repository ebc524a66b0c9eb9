"""/v1/models: the one served model, under the id clients send."""

from __future__ import annotations


def test_models_lists_the_served_model(client, model, cluster) -> None:
    models = client.models.list()
    assert [card.id for card in models.data] == [model]
    assert model == cluster.checkpoint.name  # a folder is served under its name
    assert client.models.retrieve(model).id == model
