// The device key, as the device SDK sees it: a private key in a PEM/DER PKCS#8 file (optionally
// encrypted), or a key inside a PKCS#11 token named by an RFC 7512 URI. Either way the agent gets its
// public key (SPKI DER), its UDID (hex SHA-256 of the SPKI, as the registry computes it), a way to
// sign (to build CSRs) and the credentials Node's TLS stack needs to authenticate with it.
//
// A token key never leaves the token: CSRs are signed through src/keys/pkcs11-backend.ts (pkcs11js),
// TLS client authentication goes through the OpenSSL pkcs11 engine (libp11, Debian:
// libengine-pkcs11-openssl) that Node's TLS accepts as `privateKeyEngine` / `privateKeyIdentifier`.

import { createPrivateKey, createPublicKey, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HallmarkError } from '../errors.js';
import { KEY_ALGORITHMS, keyAlgorithmOf, signingSchemeFor, type KeyAlgorithm } from '../pki/algorithms.js';
import { createCsrWith, OID_CHALLENGE_PASSWORD } from '../pki/csr.js';
import { oid, printableString, seq, set, utf8String } from '../pki/der.js';
import { encodeName } from '../pki/names.js';
import { udidOfKey } from '../registry/registry.js';
import type { Signer } from '../keys/key-backend.js';

/** How Node's TLS client authenticates with this key (tls.createSecureContext options). */
export type TlsKeyCredentials =
  | { readonly key: KeyObject }
  | { readonly privateKeyEngine: string; readonly privateKeyIdentifier: string };

export interface DeviceKey {
  readonly kind: 'file' | 'pkcs11';
  /** Where the key is, for messages: the file path, or the PKCS#11 URI without any PIN. */
  readonly description: string;
  readonly algorithm: KeyAlgorithm;
  /** SubjectPublicKeyInfo DER. */
  readonly publicKeySpki: Buffer;
  /** Hex SHA-256 of the SPKI DER: the registry's default UDID for this key. */
  readonly udid: string;
  /** Signs with the scheme signingSchemeFor(algorithm) names; signatures as X.509 carries them. */
  sign(data: Buffer): Promise<Buffer>;
  /**
   * A PKCS#10 CSR for this key, subject CN=<udid> (Hallmark takes the subject from its registry, not
   * the CSR), with a challengePassword attribute when one is given (EST channel binding).
   */
  createCsr(options?: { challengePassword?: string }): Promise<Buffer>;
  /** Credentials for TLS client authentication with this key. */
  tlsCredentials(): TlsKeyCredentials;
  /** Releases the token session (no-op for a file key). Idempotent. */
  close(): Promise<void>;
}

export interface OpenDeviceKeyOptions {
  /** Passphrase of an encrypted PKCS#8 file (-----BEGIN ENCRYPTED PRIVATE KEY-----). */
  readonly passphrase?: string;
  /** PKCS#11 user PIN; else the URI's pin-value, else HALLMARK_PKCS11_PIN. */
  readonly pin?: string;
  /** PKCS#11 module (library) path; else the URI's module-path, else HALLMARK_PKCS11_MODULE, else PKCS11_MODULE_PATH. */
  readonly module?: string;
}

/** The PKCS#9 challengePassword attribute (RFC 2985): PrintableString when the text allows it, else UTF8String. */
export function challengePasswordAttribute(value: string): Buffer {
  if (value.length === 0 || value.length > 255) throw new HallmarkError('BAD_REQUEST', 'a challengePassword is 1-255 characters');
  const printable = /^[A-Za-z0-9 '()+,\-./:=?]*$/.test(value);
  return seq(oid(OID_CHALLENGE_PASSWORD), set(printable ? printableString(value) : utf8String(value)));
}

async function csrFor(key: Pick<DeviceKey, 'publicKeySpki' | 'udid' | 'algorithm' | 'sign'>, options: { challengePassword?: string } = {}): Promise<Buffer> {
  const attributes = options.challengePassword !== undefined ? [challengePasswordAttribute(options.challengePassword)] : [];
  return createCsrWith(encodeName([{ type: 'CN', value: key.udid }]), key.publicKeySpki, signingSchemeFor(key.algorithm), (data) => key.sign(data), attributes);
}

/** Opens a device key: a file path (PEM or DER PKCS#8, SEC1 or PKCS#1 PEM) or a `pkcs11:` URI. */
export async function openDeviceKey(spec: string, options: OpenDeviceKeyOptions = {}): Promise<DeviceKey> {
  if (/^pkcs11:/i.test(spec)) return openPkcs11DeviceKey(spec, options);
  return openFileDeviceKey(spec, options);
}

/** A device key held in memory (tests, or a key the caller already has). */
export function deviceKeyFromKeyObject(privateKey: KeyObject, description = 'in-memory key'): DeviceKey {
  if (privateKey.type !== 'private') throw new HallmarkError('BAD_REQUEST', 'the device key must be a private key');
  const publicKeySpki = createPublicKey(privateKey).export({ type: 'spki', format: 'der' });
  const algorithm = keyAlgorithmOf(createPublicKey(privateKey));
  const scheme = signingSchemeFor(algorithm);
  const key: DeviceKey = {
    kind: 'file',
    description,
    algorithm,
    publicKeySpki,
    udid: udidOfKey(publicKeySpki),
    sign: async (data) => cryptoSign(scheme.hash, data, privateKey),
    createCsr: (o) => csrFor(key, o),
    tlsCredentials: () => ({ key: privateKey }),
    close: async () => {},
  };
  return key;
}

async function openFileDeviceKey(path: string, options: OpenDeviceKeyOptions): Promise<DeviceKey> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    throw new HallmarkError('KEY_NOT_FOUND', `cannot read the key file ${path}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
  if (bytes.length > 64 * 1024) throw new HallmarkError('INPUT_TOO_LARGE', `the key file ${path} is over 64 KiB`);
  const text = bytes.toString('latin1');
  const encrypted = text.includes('-----BEGIN ENCRYPTED PRIVATE KEY-----') || /Proc-Type: 4,ENCRYPTED/.test(text);
  if (encrypted && !options.passphrase) throw new HallmarkError('PASSPHRASE_REQUIRED', `the key file ${path} is encrypted: give its passphrase`);
  let privateKey: KeyObject;
  try {
    privateKey = text.includes('-----BEGIN ')
      ? createPrivateKey({ key: text, format: 'pem', ...(encrypted ? { passphrase: options.passphrase } : {}) })
      : createPrivateKey({ key: bytes, format: 'der', type: 'pkcs8' });
  } catch (err) {
    if (encrypted) throw new HallmarkError('BAD_PASSPHRASE', `the passphrase does not open the key file ${path}`);
    throw new HallmarkError('BAD_PEM', `the key file ${path} holds no readable private key (PEM or DER PKCS#8)`, { cause: err });
  }
  return deviceKeyFromKeyObject(privateKey, path);
}

// ---------------------------------------------------------------- PKCS#11

/** The `?query` attributes of a PKCS#11 URI (module-path, pin-value, pin-source, ...), decoded. */
function uriQuery(uri: string): Map<string, string> {
  const out = new Map<string, string>();
  const q = uri.indexOf('?');
  if (q < 0) return out;
  for (const part of uri.slice(q + 1).split('&')) {
    const eq = part.indexOf('=');
    if (eq <= 0) continue;
    try {
      out.set(part.slice(0, eq).toLowerCase(), decodeURIComponent(part.slice(eq + 1)));
    } catch {
      throw new HallmarkError('BAD_REQUEST', 'malformed PKCS#11 URI: bad percent-encoding in the query');
    }
  }
  return out;
}

/** RFC 7512 percent-encoding for a path attribute value (everything but unreserved characters). */
function pct(value: string): string {
  return [...Buffer.from(value, 'utf8')].map((b) => (/[A-Za-z0-9\-._~]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, '0')}`)).join('');
}

const ENGINE_DIRS = [
  '/usr/lib/x86_64-linux-gnu/engines-3',
  '/usr/lib/aarch64-linux-gnu/engines-3',
  '/usr/lib/arm-linux-gnueabihf/engines-3',
  '/usr/lib64/engines-3',
  '/usr/lib/engines-3',
  '/usr/local/lib/engines-3',
  '/opt/homebrew/lib/engines-3',
];

/**
 * Makes the OpenSSL `pkcs11` engine loadable by id from Node's TLS. Node 20 bundles its own OpenSSL,
 * whose compiled-in engine directory is not the system's, so OPENSSL_ENGINES must point at the
 * directory holding pkcs11.so. Loading by id (rather than by path) matters: OpenSSL then keeps the
 * engine in its list and initialises it once; a second dynamic load of libp11 by path in one process
 * fails ("engine routines::init failed"). libp11 reads PKCS11_MODULE_PATH when it initialises — once
 * per process, so every token key used for TLS in one process must be served by the same module.
 */
function prepareEngine(modulePath: string): void {
  if (!process.env.OPENSSL_ENGINES || !existsSync(join(process.env.OPENSSL_ENGINES, 'pkcs11.so'))) {
    const dir = process.env.HALLMARK_OPENSSL_ENGINES ?? ENGINE_DIRS.find((d) => existsSync(join(d, 'pkcs11.so')));
    if (!dir) throw new HallmarkError('KEY_BACKEND_FAILED', 'the OpenSSL pkcs11 engine (pkcs11.so) was not found: install libengine-pkcs11-openssl, or set OPENSSL_ENGINES to its directory');
    process.env.OPENSSL_ENGINES = dir;
  }
  process.env.PKCS11_MODULE_PATH ??= modulePath;
}

async function openPkcs11DeviceKey(uri: string, options: OpenDeviceKeyOptions): Promise<DeviceKey> {
  const { parsePkcs11Uri, formatPkcs11Uri, Pkcs11KeyBackend } = await import('../keys/pkcs11-backend.js');
  const parsed = parsePkcs11Uri(uri);
  const query = uriQuery(uri);
  if (!parsed.token) throw new HallmarkError('BAD_REQUEST', 'the PKCS#11 URI must name the token (token=…)');
  if (!parsed.id || parsed.id.length === 0) throw new HallmarkError('BAD_REQUEST', 'the PKCS#11 URI must name the key by its id (id=%…)');
  if (parsed.type !== undefined && parsed.type !== 'private') throw new HallmarkError('BAD_REQUEST', `the PKCS#11 URI names a ${parsed.type} object, not a private key`);
  const module = options.module ?? query.get('module-path') ?? parsed.attributes.get('module-path') ?? process.env.HALLMARK_PKCS11_MODULE ?? process.env.PKCS11_MODULE_PATH;
  if (!module) throw new HallmarkError('BAD_REQUEST', 'which PKCS#11 module? give --pkcs11-module, module-path in the URI, or HALLMARK_PKCS11_MODULE');
  const pin = options.pin ?? parsed.attributes.get('pin-value') ?? query.get('pin-value') ?? process.env.HALLMARK_PKCS11_PIN;
  if (!pin) throw new HallmarkError('PASSPHRASE_REQUIRED', 'a PKCS#11 user PIN is needed: pin-value in the URI, or HALLMARK_PKCS11_PIN');
  // Without the PIN: what messages and references show.
  const reference = formatPkcs11Uri({ token: parsed.token, id: parsed.id, object: parsed.object, type: 'private' });

  const backend = await Pkcs11KeyBackend.open({ module, token: parsed.token, pin });
  let signer: Signer | undefined;
  try {
    // The reference must name the algorithm; the token knows it, so try each (P-256 first: the device case).
    let lastError: unknown;
    for (const algorithm of KEY_ALGORITHMS) {
      try {
        signer = await backend.signer({ backend: 'pkcs11', id: reference, algorithm });
        break;
      } catch (err) {
        lastError = err;
        if (!(err instanceof HallmarkError && err.code === 'KEY_NOT_FOUND' && /but the reference says/.test(err.message))) throw err;
      }
    }
    if (!signer) throw lastError;
  } catch (err) {
    await backend.close();
    throw err;
  }
  const found = signer;
  let closed = false;
  const key: DeviceKey = {
    kind: 'pkcs11',
    description: reference,
    algorithm: found.ref.algorithm,
    publicKeySpki: found.publicKeySpki,
    udid: udidOfKey(found.publicKeySpki),
    sign: (data) => found.sign(data),
    createCsr: (o) => csrFor(key, o),
    tlsCredentials() {
      prepareEngine(module);
      return { privateKeyEngine: 'pkcs11', privateKeyIdentifier: `${reference};pin-value=${pct(pin)}` };
    },
    async close() {
      if (closed) return;
      closed = true;
      await backend.close();
    },
  };
  return key;
}
