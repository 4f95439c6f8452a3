// Manifest signers: the certificates or public keys an operator names with --trust. A manifest is
// accepted only when it is signed by one of them; nothing else (no chain, no system store) is trusted.

import { createHash, createPublicKey, type KeyObject } from 'node:crypto';
import { HallmarkError } from '../../errors.js';
import { parseCertificate, type ParsedCertificate } from '../../pki/certificate.js';
import { EXT, decodeSubjectKeyId } from '../../pki/extensions.js';
import { nameToString } from '../../pki/names.js';
import { SIZE_LIMITS, decodePemBlocks } from '../../pki/pem.js';

export interface ManifestSigner {
  /** Where it came from (a file name), for messages. */
  readonly source: string;
  /** Subject DN of the certificate, or "public key" for a bare key. */
  readonly name: string;
  /** Hex SHA-256 of the certificate DER, or of the SPKI DER for a bare key. */
  readonly sha256: string;
  readonly key: KeyObject;
  /** "ec-p256" or "ed25519" (anything else is refused when loaded). */
  readonly keyType: 'ec-p256' | 'ed25519';
  readonly certificate?: ParsedCertificate;
  /** JWS x5t#S256: base64url SHA-256 of the certificate DER. */
  readonly x5tS256?: string;
  /** JWS kid as Microchip uses it: base64url of the certificate's subject key identifier. */
  readonly kid?: string;
}

export interface SignerSummary { readonly name: string; readonly sha256: string; readonly source: string; readonly notAfter?: string }

export function summariseSigner(s: ManifestSigner): SignerSummary {
  return { name: s.name, sha256: s.sha256, source: s.source, ...(s.certificate ? { notAfter: s.certificate.notAfter.toISOString() } : {}) };
}

function keyTypeOf(key: KeyObject, source: string): ManifestSigner['keyType'] {
  if (key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'prime256v1') return 'ec-p256';
  if (key.asymmetricKeyType === 'ed25519') return 'ed25519';
  throw new HallmarkError('UNSUPPORTED_ALGORITHM', `${source}: a manifest signer key must be EC P-256 or Ed25519, not ${key.asymmetricKeyType}${key.asymmetricKeyDetails?.namedCurve ? ' ' + key.asymmetricKeyDetails.namedCurve : ''}`);
}

function fromCertificate(der: Buffer, source: string): ManifestSigner {
  const certificate = parseCertificate(der);
  const key = createPublicKey({ key: certificate.subjectPublicKeyInfo, format: 'der', type: 'spki' });
  const ski = certificate.extensions.get(EXT.subjectKeyIdentifier);
  return {
    source, name: nameToString(certificate.subject), sha256: createHash('sha256').update(der).digest('hex'), key, keyType: keyTypeOf(key, source), certificate,
    x5tS256: createHash('sha256').update(der).digest('base64url'),
    kid: ski ? decodeSubjectKeyId(ski.value).toString('base64url') : undefined,
  };
}

function fromPublicKey(spki: Buffer, source: string): ManifestSigner {
  let key: KeyObject;
  try { key = createPublicKey({ key: spki, format: 'der', type: 'spki' }); } catch (err) {
    throw new HallmarkError('BAD_DER', `${source}: the public key cannot be read (${(err as Error).message})`);
  }
  const canonical = key.export({ type: 'spki', format: 'der' });
  return { source, name: 'public key', sha256: createHash('sha256').update(canonical).digest('hex'), key, keyType: keyTypeOf(key, source) };
}

/**
 * Reads one --trust file: PEM with CERTIFICATE and/or PUBLIC KEY blocks, or one DER certificate.
 * Each block is one signer.
 */
export function loadSigners(content: Buffer, source: string): ManifestSigner[] {
  if (content.length > SIZE_LIMITS.chain) throw new HallmarkError('INPUT_TOO_LARGE', `${source}: a signer file is at most ${SIZE_LIMITS.chain} bytes`);
  if (content[0] === 0x30) return [fromCertificate(content, source)];
  const text = content.toString('utf8');
  const blocks = decodePemBlocks(text, SIZE_LIMITS.chain);
  const signers: ManifestSigner[] = [];
  for (const b of blocks) {
    if (b.label === 'CERTIFICATE') signers.push(fromCertificate(b.der, source));
    else if (b.label === 'PUBLIC KEY') signers.push(fromPublicKey(b.der, source));
    else throw new HallmarkError('BAD_PEM', `${source}: a signer file holds CERTIFICATE or PUBLIC KEY blocks, not ${b.label}`);
  }
  return signers;
}
