// Shared pieces of manifest parsing: per-entry errors, strict base64 fields, key and certificate checks.

import type { KeyObject } from 'node:crypto';
import { HallmarkError } from '../../errors.js';
import { isAcceptableSubjectKey, publicKeyFromSpki } from '../../pki/algorithms.js';
import { parseCertificate } from '../../pki/certificate.js';
import type { DeviceRegistration } from '../registry.js';
import { isP256Point, isP256Spki } from '../../pki/p256.js';

/** A problem with one entry: reported (and skipped with --skip-invalid) rather than ending the import. */
export class EntryError extends Error {
  readonly udid?: string;
  /** The error code the import fails with when this entry is not skipped. */
  readonly code: 'MANIFEST_INVALID' | 'BIRTH_CERT_INVALID';
  constructor(reason: string, udid?: string, code: EntryError['code'] = 'MANIFEST_INVALID') {
    super(reason);
    this.name = 'EntryError';
    this.udid = udid;
    this.code = code;
  }
}

/** A registration whose UDID is always set (the manifest decides it). */
export type ManifestDevice = DeviceRegistration & { readonly udid: string };

/** What a format parser yields for each entry, in file order. */
export type ParsedEntry =
  /** position: the entry number (Microchip) or line number (CSV, NDJSON) in the file. */
  | { readonly ok: true; readonly position: number; readonly device: ManifestDevice }
  | { readonly ok: false; readonly where: string; readonly udid?: string; readonly reason: string; readonly code: EntryError['code'] };

/** Checks a birth certificate (and its chain) for a device key; throws when it does not verify. */
export type BirthCheck = (certificate: Buffer, chain: readonly Buffer[], publicKeySpki: Buffer) => Promise<void>;

const B64 = /^[A-Za-z0-9+/_-]*={0,2}$/;

/** Decodes base64 or base64url, padded or not (Microchip's x/y quirk). Anything else is refused. */
export function decodeBase64(value: unknown, what: string, udid?: string): Buffer {
  if (typeof value !== 'string' || value.length === 0) throw new EntryError(`${what} is missing or not a string`, udid);
  if (!B64.test(value)) throw new EntryError(`${what} is not base64`, udid);
  const padded = value.includes('=');
  if ((padded && value.length % 4 !== 0) || (!padded && value.length % 4 === 1)) throw new EntryError(`${what} is not base64 (bad length)`, udid);
  if (/[+/]/.test(value) && /[-_]/.test(value)) throw new EntryError(`${what} mixes the base64 and base64url alphabets`, udid);
  return Buffer.from(value, 'base64');
}

/** Strict base64url without padding, as JWS requires for its three parts. */
export function decodeBase64Url(value: unknown, what: string, udid?: string): Buffer {
  if (typeof value !== 'string' || value.length === 0) throw new EntryError(`${what} is missing or not a string`, udid);
  if (!/^[A-Za-z0-9_-]*$/.test(value) || value.length % 4 === 1) throw new EntryError(`${what} is not base64url`, udid);
  return Buffer.from(value, 'base64url');
}

/**
 * Checks an SPKI public key and returns its canonical DER. P-256 keys in their canonical form (nearly
 * every chip key) are checked in JS (p256.ts, ~2 µs); others go through OpenSSL. Points off the curve are refused.
 */
export function importSpki(der: Buffer, udid?: string): Buffer {
  if (isP256Spki(der)) {
    if (!isP256Point(der.subarray(27, 59), der.subarray(59, 91))) throw new EntryError('the public key is not a point on P-256', udid);
    return der;
  }
  let key: KeyObject;
  try {
    key = publicKeyFromSpki(der);
  } catch {
    throw new EntryError('the public key cannot be imported (malformed, unsupported, or an EC point not on its curve)', udid);
  }
  if (!isAcceptableSubjectKey(key)) {
    const d = key.asymmetricKeyDetails ?? {};
    throw new EntryError(`unsupported key ${key.asymmetricKeyType}${d.namedCurve ? ' ' + d.namedCurve : ''}${d.modulusLength ? ' ' + d.modulusLength : ''} (EC P-256, P-384, P-521, Ed25519 or RSA 2048-8192)`, udid);
  }
  return key.export({ type: 'spki', format: 'der' });
}

/** Parses a birth certificate and checks it carries `spki`. */
export function checkCertificateKey(der: Buffer, spki: Buffer, udid?: string): void {
  let cert;
  try { cert = parseCertificate(der); } catch (err) { throw new EntryError(`the birth certificate cannot be parsed: ${(err as Error).message}`, udid); }
  let certSpki: Buffer;
  try { certSpki = importSpki(cert.subjectPublicKeyInfo); } catch { throw new EntryError('the birth certificate key cannot be read', udid); }
  if (!certSpki.equals(spki)) throw new EntryError('the birth certificate does not carry the entry\'s public key', udid);
}

// The certificate subject serialNumber is a PrintableString (registry.ts checks the same).
const SERIAL = /^[A-Za-z0-9 '()+,\-./:=?]{1,64}$/;

export function checkSerial(value: string, udid?: string): string {
  if (!SERIAL.test(value)) throw new EntryError(`serial ${JSON.stringify(value.slice(0, 80))} is not 1-64 characters of A-Z a-z 0-9 space ' ( ) + , - . / : = ?`, udid);
  return value;
}

/** Hex UDID, 1-32 bytes, lowercased (separators ":" "-" and spaces are dropped, as in registry.ts). */
export function checkUdid(value: string, what: string, udid?: string): string {
  const u = value.toLowerCase().replace(/[:\s-]/g, '');
  if (!/^[0-9a-f]{2,64}$/.test(u) || u.length % 2) throw new EntryError(`${what} ${JSON.stringify(value.slice(0, 80))} is not 1-32 bytes of hex`, udid);
  return u;
}

/** Runs a birth check, turning its refusal into an EntryError that names the UDID. */
export async function birthChecked(check: BirthCheck, certificate: Buffer, chain: readonly Buffer[], spki: Buffer, udid: string): Promise<void> {
  try {
    await check(certificate, chain, spki);
  } catch (err) {
    if (err instanceof HallmarkError && (err.code === 'BIRTH_CERT_INVALID' || err.code === 'BAD_DER' || err.code === 'UNSUPPORTED_ALGORITHM' || err.code === 'INPUT_TOO_LARGE')) {
      throw new EntryError(err.code === 'BIRTH_CERT_INVALID' ? err.message : `birth certificate: ${err.message}`, udid, 'BIRTH_CERT_INVALID');
    }
    throw err;
  }
}

export function entryFailure(where: string, err: unknown): ParsedEntry {
  if (err instanceof EntryError) return { ok: false, where, udid: err.udid, reason: err.message, code: err.code };
  if (err instanceof HallmarkError && ['BAD_DER', 'BAD_PEM', 'UNSUPPORTED_ALGORITHM', 'INPUT_TOO_LARGE', 'BAD_REQUEST'].includes(err.code)) return { ok: false, where, reason: err.message, code: 'MANIFEST_INVALID' };
  throw err;
}
