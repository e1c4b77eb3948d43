"""splitserve_common/security.py: bad TLS settings are a ConfigurationError (library code never exits)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from splitserve_common.channels import ChannelSecurity, sync_channel
from splitserve_common.errors import ConfigurationError
from splitserve_common.security import read_pem, server_credentials


def test_unreadable_pem_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read TLS CA .*missing.pem"):
        read_pem(str(tmp_path / "missing.pem"), "TLS CA")
    # An SDK caller with a bad CA path gets the error, not SystemExit.
    with pytest.raises(ConfigurationError):
        sync_channel("127.0.0.1:1", ChannelSecurity(ca=str(tmp_path / "missing.pem")))


@pytest.mark.parametrize("cert, key, client_ca, fragment", [
    ("c.pem", "", "", "needs both --tls-cert and --tls-key"),
    ("", "", "ca.pem", "--tls-client-ca needs --tls-cert and --tls-key"),
])
def test_incomplete_server_tls_is_a_configuration_error(cert, key, client_ca, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        server_credentials(SimpleNamespace(tls_cert=cert, tls_key=key, tls_client_ca=client_ca))
