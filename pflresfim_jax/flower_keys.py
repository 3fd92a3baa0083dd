"""Keys for a Flower deployment with TLS and SuperNode authentication.

Two things a federation needs before its first run, written with ``cryptography`` (a
dependency of Flower itself), so no openssl or ssh-keygen is required:

- ``server``: a certificate authority and the SuperLink's TLS certificate for the host
  names and addresses the hospitals dial (``ca.crt`` goes to every hospital, ``ca.key``
  stays offline, ``server.pem``/``server.key`` on the SuperLink).
- ``node``: a SuperNode's key pair, made at the hospital. The private key (OpenSSH
  format, mode 0600, what ``flower-supernode --auth-supernode-private-key`` reads) never
  leaves it; the ``.pub`` file (OpenSSH, NIST P-384) is what the federation's operator
  registers with ``flwr supernode register`` on a SuperLink started with
  ``--enable-supernode-auth``.

    python -m pflresfim_jax.flower_keys server --out certs --hosts server.example.org,10.0.0.5
    python -m pflresfim_jax.flower_keys node --out keys --name hospital0
"""
import argparse
import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CURVE = ec.SECP384R1   # Flower's node authentication takes NIST curves; P-384 as its guide


def _write(path: str, data: bytes, private: bool = False) -> str:
  """Writes a new file; refuses to overwrite one (a key replaced by mistake is lost)."""
  if os.path.exists(path):
    raise FileExistsError(f'{path} exists: move it away or choose another --out')
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  return path


def _pem_key(key) -> bytes:
  return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _san(host: str):
  try:
    return x509.IPAddress(ipaddress.ip_address(host))
  except ValueError:
    return x509.DNSName(host)


def _certificate(subject, issuer, public_key, signing_key, days, extensions):
  now = datetime.datetime.now(datetime.timezone.utc)
  builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=days)))
  for ext, critical in extensions:
    builder = builder.add_extension(ext, critical=critical)
  return builder.sign(signing_key, hashes.SHA256())


def server(out: str, hosts: list[str], days: int = 365, name: str = 'pflresfim') -> dict[str, str]:
  """A CA and the SuperLink's certificate for ``hosts`` (DNS names or IP addresses).

  Returns {'ca': ca.crt, 'ca_key': ca.key, 'cert': server.pem, 'key': server.key} paths.
  """
  if not hosts or not all(h.strip() for h in hosts):
    raise ValueError(f'--hosts: give the names or addresses the SuperNodes dial, got {hosts!r}')
  if days < 1:
    raise ValueError(f'--days: the certificates must be valid for at least 1 day, got {days}')
  os.makedirs(out, exist_ok=True)
  ca_key, key = ec.generate_private_key(_CURVE()), ec.generate_private_key(_CURVE())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f'{name} federation CA')])
  ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, days,
                    [(x509.BasicConstraints(ca=True, path_length=0), True),
                     (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)])
  cert = _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name,
                      key.public_key(), ca_key, days,
                      [(x509.SubjectAlternativeName([_san(h.strip()) for h in hosts]), False),
                       (x509.BasicConstraints(ca=False, path_length=None), True),
                       (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
  pem = serialization.Encoding.PEM
  return {'ca': _write(os.path.join(out, 'ca.crt'), ca.public_bytes(pem)),
          'ca_key': _write(os.path.join(out, 'ca.key'), _pem_key(ca_key), private=True),
          'cert': _write(os.path.join(out, 'server.pem'), cert.public_bytes(pem)),
          'key': _write(os.path.join(out, 'server.key'), _pem_key(key), private=True)}


def node(out: str, name: str) -> dict[str, str]:
  """A SuperNode's key pair: {'private': <out>/<name>, 'public': <out>/<name>.pub}."""
  if not name or os.sep in name:
    raise ValueError(f'--name: a file name for the key, got {name!r}')
  os.makedirs(out, exist_ok=True)
  key = ec.generate_private_key(_CURVE())
  ssh = serialization.Encoding.OpenSSH
  private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption())
  public = key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH)
  return {'private': _write(os.path.join(out, name), private, private=True),
          'public': _write(os.path.join(out, name + '.pub'), public + f' {name}\n'.encode())}


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m pflresfim_jax.flower_keys', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='what', required=True)
  s = sub.add_parser('server', help='a CA and the SuperLink TLS certificate')
  s.add_argument('--out', required=True)
  s.add_argument('--hosts', required=True, help='comma-separated names/addresses of the SuperLink')
  s.add_argument('--days', type=int, default=365)
  n = sub.add_parser('node', help="a SuperNode's authentication key pair")
  n.add_argument('--out', required=True)
  n.add_argument('--name', required=True)
  args = parser.parse_args(argv)
  try:
    paths = (server(args.out, args.hosts.split(','), args.days) if args.what == 'server'
             else node(args.out, args.name))
  except (ValueError, FileExistsError) as e:
    parser.error(str(e))
  for role, path in paths.items():
    print(f'{role:8s} {path}')


if __name__ == '__main__':
  main()
