// Signature checks between certificates.

import { verify as cryptoVerify } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { SCHEME_BY_OID, publicKeyFromSpki } from './algorithms.js';
import type { ParsedCertificate } from './certificate.js';

/** Checks that `cert` names `issuer` as issuer and carries a valid signature by its key. */
export function verifyIssuedBy(cert: ParsedCertificate, issuer: ParsedCertificate): void {
  if (!cert.issuer.equals(issuer.subject)) throw new HallmarkError('CA_CERT_MISMATCH', 'the certificate was not issued by this CA (issuer name differs)');
  const scheme = SCHEME_BY_OID.get(cert.signatureAlgorithmOid);
  if (!scheme) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `unsupported signature algorithm ${cert.signatureAlgorithmOid}`);
  const ok = cryptoVerify(scheme.hash, cert.tbs, publicKeyFromSpki(issuer.subjectPublicKeyInfo), cert.signature);
  if (!ok) throw new HallmarkError('CA_CERT_MISMATCH', 'the certificate signature does not verify with the CA key');
}

