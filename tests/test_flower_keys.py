"""flower_keys: the CA, the SuperLink certificate and SuperNode key pairs verify as the
TLS and node-authentication ends read them (the loopback test in test_flower.py uses
them against the real Flower components)."""
import ipaddress
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pflresfim_jax import flower_keys


def _cert(path):
  with open(path, 'rb') as f:
    return x509.load_pem_x509_certificate(f.read())


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
  paths = flower_keys.server(str(tmp_path), ['server.example.org', '10.0.0.5'], days=3)
  ca, cert = _cert(paths['ca']), _cert(paths['cert'])
  cert.verify_directly_issued_by(ca)            # raises if the signature or issuer is wrong
  san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
  assert san.get_values_for_type(x509.DNSName) == ['server.example.org']
  assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address('10.0.0.5')]
  assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
  assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
  days = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400
  assert 3.0 < days < 3.01
  with open(paths['key'], 'rb') as f:
    key = serialization.load_pem_private_key(f.read(), None)
  assert key.public_key().public_numbers() == cert.public_key().public_numbers()
  for private in (paths['key'], paths['ca_key']):
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600


def test_node_key_pair_is_openssh_p384_and_matches(tmp_path):
  paths = flower_keys.node(str(tmp_path), 'hospital0')
  with open(paths['private'], 'rb') as f:
    private = serialization.load_ssh_private_key(f.read(), None)   # as flower-supernode reads it
  with open(paths['public'], 'rb') as f:
    public = serialization.load_ssh_public_key(f.read())            # as flwr supernode register
  assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == 'secp384r1'
  assert private.public_key().public_numbers() == public.public_numbers()
  signature = private.sign(b'timestamp', ec.ECDSA(hashes.SHA256()))
  public.verify(signature, b'timestamp', ec.ECDSA(hashes.SHA256()))
  assert stat.S_IMODE(os.stat(paths['private']).st_mode) == 0o600
  other = flower_keys.node(str(tmp_path), 'hospital1')
  with open(other['public'], 'rb') as f:
    assert serialization.load_ssh_public_key(f.read()).public_numbers() != public.public_numbers()


def test_existing_keys_are_never_overwritten_and_bad_arguments_are_named(tmp_path):
  paths = flower_keys.node(str(tmp_path), 'hospital0')
  with open(paths['private'], 'rb') as f:
    before = f.read()
  with pytest.raises(FileExistsError, match='hospital0'):
    flower_keys.node(str(tmp_path), 'hospital0')
  with open(paths['private'], 'rb') as f:
    assert f.read() == before
  with pytest.raises(ValueError, match='--hosts'):
    flower_keys.server(str(tmp_path / 's'), [])
  with pytest.raises(ValueError, match='--days'):
    flower_keys.server(str(tmp_path / 's'), ['localhost'], days=0)
  with pytest.raises(ValueError, match='--name'):
    flower_keys.node(str(tmp_path), 'a/b')
  run = subprocess.run([sys.executable, '-m', 'pflresfim_jax.flower_keys', 'node', '--out',
                        str(tmp_path), '--name', 'hospital0'], capture_output=True, text=True)
  assert run.returncode == 2 and 'hospital0 exists' in run.stderr
