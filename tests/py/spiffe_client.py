"""An independent SPIFFE Workload API client (py-spiffe) for Ward's tests.

usage:
  spiffe_client.py x509 ENDPOINT OUTDIR      writes chain.pem and bundle.pem, prints the SPIFFE ID
  spiffe_client.py jwt ENDPOINT AUDIENCE     prints a JWT-SVID
  spiffe_client.py validate ENDPOINT AUDIENCE TOKEN   prints the validated SPIFFE ID
  spiffe_client.py bundle ENDPOINT TRUST_DOMAIN    prints how many X.509 and JWT
                                                   authorities the bundle of TRUST_DOMAIN has
"""
import os
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient


def main():
    cmd, endpoint = sys.argv[1], sys.argv[2]
    with WorkloadApiClient(socket_path=endpoint, default_timeout=20) as client:
        if cmd == "x509":
            out = sys.argv[3]
            svid = client.fetch_x509_svid()
            bundles = client.fetch_x509_bundles()
            bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
            pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
            with open(os.path.join(out, "chain.pem"), "wb") as f:
                for c in svid.cert_chain:
                    f.write(pem(c))
            with open(os.path.join(out, "bundle.pem"), "wb") as f:
                for c in bundle.x509_authorities:
                    f.write(pem(c))
            print(svid.spiffe_id)
        elif cmd == "jwt":
            print(client.fetch_jwt_svid(audience={sys.argv[3]}).token)
        elif cmd == "bundle":
            td = TrustDomain(sys.argv[3])
            x509 = client.fetch_x509_bundles().get_bundle_for_trust_domain(td)
            jwt = client.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
            if x509 is None or jwt is None:
                sys.exit("no bundle for " + sys.argv[3])
            print(len(x509.x509_authorities), len(jwt.jwt_authorities))
        elif cmd == "validate":
            print(client.validate_jwt_svid(sys.argv[4], sys.argv[3]).spiffe_id)
        else:
            sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
