// Builds, signs and checks one certificate. The only place a certificate signature is made.

import { randomBytes } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { keyAlgorithmOf, signingSchemeFor, type KeyAlgorithm, type SignatureScheme } from '../pki/algorithms.js';
import { assembleCertificate, encodeTbsCertificate, parseCertificate, serialToHex, type ParsedCertificate } from '../pki/certificate.js';
import { keyIdentifier, type AltNames } from '../pki/extensions.js';
import type { Signer } from '../keys/key-backend.js';
import type { KeyObject } from 'node:crypto';
import { checkAgainstProfile, extensionsFor, pointerExtensions, type CertificateProfile, type ProfileInputs, type RevocationPointers } from './profiles.js';

/** A CA able to sign: its name (DER), key identifier, validity end and key. */
export interface SigningCa {
  readonly subject: Buffer;
  readonly keyId: Buffer;
  /** Certificates are cut off at the issuer's own expiry. Undefined for a root signing itself. */
  readonly notAfter?: Date;
  readonly signer: Signer;
  readonly scheme: SignatureScheme;
  /** Revocation pointers written into the end-entity certificates this CA issues. */
  readonly pointers?: RevocationPointers;
}

export function signingCa(subject: Buffer, keyId: Buffer, signer: Signer, notAfter?: Date): SigningCa {
  return { subject, keyId, signer, notAfter, scheme: signingSchemeFor(signer.ref.algorithm) };
}

/**
 * A fresh serial: 16 CSPRNG bytes with the top bit cleared (positive, 127 bits of entropy, well over
 * the 64 that CA/B and RFC 5280 practice ask for). Uniqueness is enforced by the store's constraint.
 */
// CSPRNG output drawn 4 KiB at a time and handed out 16 bytes per serial, each byte used once:
// randomBytes(16) per certificate cost ~2-3 µs of call overhead on the event loop, more than the bytes.
let serialPool = Buffer.alloc(0);
let serialPoolOffset = 0;

export function newSerial(): Buffer {
  if (serialPoolOffset + 16 > serialPool.length) {
    serialPool = randomBytes(4096);
    serialPoolOffset = 0;
  }
  const b = Buffer.from(serialPool.subarray(serialPoolOffset, serialPoolOffset + 16));
  serialPoolOffset += 16;
  b[0] = (b[0]! & 0x7f) | 0x01; // positive, and never a leading zero octet (stable 16-byte length)
  return b;
}

export interface CertificateOrder {
  readonly profile: CertificateProfile;
  readonly subject: Buffer;
  readonly subjectPublicKeyInfo: Buffer;
  /** Known algorithm of the subject key, or a family for keys a CA would not use itself. */
  readonly subjectKeyKind: ProfileInputs['subjectKeyKind'];
  readonly validityDays?: number;
  readonly notBefore?: Date;
  readonly altNames?: AltNames;
  readonly pathLen?: number;
  readonly permittedDns?: readonly string[];
  /** CA profiles: permitted directoryName subtrees (encoded Names), e.g. a factory station's batch. */
  readonly permittedDirectoryNames?: readonly Buffer[];
  /** A factory station's sub-CA: the SHA-256 of its package manifest (extensions.ts EXT.stationManifest). */
  readonly stationManifestSha256?: Buffer;
}

export interface SignedCertificate {
  readonly der: Buffer;
  readonly parsed: ParsedCertificate;
  readonly serialHex: string;
}

/** Clock-skew allowance: notBefore is set this far in the past. */
const BACKDATE_MS = 5 * 60 * 1000;

export function subjectKeyKindOf(key: KeyObject): ProfileInputs['subjectKeyKind'] {
  try {
    return keyAlgorithmOf(key) as KeyAlgorithm;
  } catch {
    return key.asymmetricKeyType === 'rsa' ? 'other-rsa' : 'other-ec';
  }
}

export async function signCertificate(ca: SigningCa, order: CertificateOrder, selfSigned = false): Promise<SignedCertificate> {
  const { profile } = order;
  const days = order.validityDays ?? profile.defaultValidityDays;
  if (!Number.isInteger(days) || days < 1 || days > profile.maxValidityDays) {
    throw new HallmarkError('PROFILE_VIOLATION', `validity of ${days} days is outside 1..${profile.maxValidityDays} for profile ${profile.name}`);
  }
  if (profile.ca && order.pathLen !== undefined && (!Number.isInteger(order.pathLen) || order.pathLen < 0 || order.pathLen > 8)) {
    throw new HallmarkError('PROFILE_VIOLATION', 'path length must be an integer from 0 to 8');
  }
  const now = order.notBefore ?? new Date(Date.now() - BACKDATE_MS);
  const notBefore = new Date(Math.floor(now.getTime() / 1000) * 1000);
  let notAfter = new Date(notBefore.getTime() + days * 86_400_000);
  if (ca.notAfter && notAfter > ca.notAfter) notAfter = ca.notAfter; // never outlive the issuer
  if (ca.notAfter && ca.notAfter <= new Date()) throw new HallmarkError('CA_NOT_ACTIVE', 'the issuing CA has expired');
  const serial = newSerial();
  const issuerKeyId = selfSigned ? undefined : ca.keyId;
  const extensions = extensionsFor(profile, {
    subjectPublicKeyInfo: order.subjectPublicKeyInfo,
    subjectKeyKind: order.subjectKeyKind,
    issuerKeyId,
    altNames: order.altNames,
    pathLen: order.pathLen,
    permittedDns: order.permittedDns,
    permittedDirectoryNames: order.permittedDirectoryNames,
    stationManifestSha256: order.stationManifestSha256,
    pointers: ca.pointers,
  });
  const issuer = selfSigned ? order.subject : ca.subject;
  const tbs = encodeTbsCertificate({ serial, scheme: ca.scheme, issuer, notBefore, notAfter, subject: order.subject, subjectPublicKeyInfo: order.subjectPublicKeyInfo, extensions });
  const signature = await ca.signer.sign(tbs);
  const der = assembleCertificate(tbs, ca.scheme, signature);
  const parsed = parseCertificate(der);
  const serialHex = serialToHex(serial);
  const a = order.altNames;
  checkAgainstProfile(profile, parsed, {
    serialHex,
    issuer,
    subject: order.subject,
    subjectPublicKeyInfo: order.subjectPublicKeyInfo,
    notBefore,
    notAfter,
    signatureAlgorithm: ca.scheme.algorithmIdentifier,
    issuerKeyId: issuerKeyId ?? keyIdentifier(order.subjectPublicKeyInfo),
    pathLen: profile.ca ? order.pathLen : undefined,
    subjectKeyKind: order.subjectKeyKind,
    altNamesPresent: !!a && [a.dns, a.ip, a.uri, a.email].some((l) => (l?.length ?? 0) > 0),
    nameConstraintsPresent: (order.permittedDns?.length ?? 0) + (order.permittedDirectoryNames?.length ?? 0) > 0,
    pointerExtensions: pointerExtensions(profile, ca.pointers),
    stationManifestSha256: order.stationManifestSha256,
  });
  return { der, parsed, serialHex };
}

