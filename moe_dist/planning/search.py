def search(cfg):
    raise NotImplementedError


def render_search(result):
    raise NotImplementedError


def search_json(result):
    raise NotImplementedError
