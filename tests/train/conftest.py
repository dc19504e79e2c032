import pytest

from tests.e2e_helpers import TINY


@pytest.fixture
def tiny_args():
    return list(TINY)
