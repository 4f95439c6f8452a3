// Keys generated and kept inside a PKCS#11 token (SoftHSM2, YubiHSM, network HSMs).
//
// The private key never leaves the token: it is created with CKA_SENSITIVE=true and
// CKA_EXTRACTABLE=false, and every signature is computed by the token. A KeyRef names the key with
// an RFC 7512 PKCS#11 URI whose `id` attribute (a random 16-byte CKA_ID) is authoritative; labels
// are for humans and need not be unique.
//
// PKCS#11 state is per process, not per object, which shapes this file:
//   - C_Initialize may run once per loaded module, so one module entry per library path is shared
//     by every backend and finalised when the last one closes.
//   - Login state belongs to the application and the token, not to a session: a second C_Login
//     answers CKR_USER_ALREADY_LOGGED_IN whatever PIN it is given, and C_Logout logs every session
//     out. So logins are reference-counted per token, and a later open() is checked against a keyed
//     digest of the PIN that logged in.
//   - A session runs one cryptographic operation at a time, so each backend serialises its calls.

import { createHash, createHmac, createPublicKey, randomBytes, timingSafeEqual } from 'node:crypto';
import { realpathSync } from 'node:fs';
import { endianness } from 'node:os';
import pkcs11js from 'pkcs11js';
import type { Handle, PKCS11, Template } from 'pkcs11js';
import { HallmarkError } from '../errors.js';
import { KEY_ALGORITHMS, OID, publicKeyFromSpki, type KeyAlgorithm } from '../pki/algorithms.js';
import { TAG, bitString, decodeOid, oid, readWhole, seq } from '../pki/der.js';
import { ecdsaRawToDer } from '../pki/ecdsa-signature.js';
import type { KeyBackend, KeyRef, Signer } from './key-backend.js';

// PKCS#11 3.0 constants that pkcs11js (a 2.40 binding) does not export.
const CKK_EC_EDWARDS = 0x40;
const CKM_EC_EDWARDS_KEY_PAIR_GEN = 0x1055;
const CKM_EDDSA = 0x1057;

const CKA_ID_LENGTH = 16;
const RSA_PUBLIC_EXPONENT = Buffer.from([0x01, 0x00, 0x01]); // 65537

// ---------------------------------------------------------------- errors

/** The CKR_ name of a pkcs11js error, or null for other errors. */
function ckrName(err: unknown): string | null {
  const message = (err as { message?: unknown } | null)?.message;
  if (typeof message !== 'string') return null;
  const m = /\b(CKR_[A-Z0-9_]+)\b/.exec(message);
  return m ? m[1]! : null;
}

/**
 * Wraps a failure as KEY_BACKEND_FAILED naming the operation and the CKR code. pkcs11js messages
 * carry only the CKR name, never call arguments, so nothing secret reaches the message.
 */
function backendError(operation: string, err: unknown): HallmarkError {
  if (err instanceof HallmarkError) return err;
  const ckr = ckrName(err);
  const detail = ckr ?? ((err as { message?: unknown } | null)?.message as string | undefined) ?? String(err);
  return new HallmarkError('KEY_BACKEND_FAILED', `PKCS#11 ${operation} failed: ${detail}`, { cause: err });
}

function p11<T>(operation: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw backendError(operation, err);
  }
}

async function p11Async<T>(operation: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw backendError(operation, err);
  }
}

// ---------------------------------------------------------------- RFC 7512 URIs

export interface Pkcs11Uri {
  /** Token label (CKA token info `label`, without its blank padding). */
  readonly token?: string;
  /** Object label (CKA_LABEL). */
  readonly object?: string;
  /** Object id (CKA_ID), raw bytes. */
  readonly id?: Buffer;
  /** Object class: private, public, cert, secret-key, data. */
  readonly type?: string;
  /** Every other path attribute (manufacturer, serial, model, slot-id, ...), decoded as UTF-8. */
  readonly attributes: ReadonlyMap<string, string>;
}

function badUri(what: string): HallmarkError {
  return new HallmarkError('BAD_REQUEST', `malformed PKCS#11 URI: ${what}`);
}

// RFC 7512 §2.3: pk11-pchar = unreserved / pk11-path-res-avail / pct-encoded. "=" is allowed too,
// but we encode it anyway so that naive parsers splitting on "=" cannot go wrong.
const PATH_LITERAL = /^[A-Za-z0-9\-._~:[\]@!$'()*+,]$/;

function pctEncodeText(value: string): string {
  let out = '';
  for (const byte of Buffer.from(value, 'utf8')) {
    const ch = String.fromCharCode(byte);
    out += byte < 0x80 && PATH_LITERAL.test(ch) ? ch : '%' + byte.toString(16).toUpperCase().padStart(2, '0');
  }
  return out;
}

const pctEncodeBytes = (bytes: Buffer): string => [...bytes].map((b) => '%' + b.toString(16).padStart(2, '0')).join('');

function pctDecode(value: string, attribute: string): Buffer {
  const bytes: number[] = [];
  for (let i = 0; i < value.length; i++) {
    const ch = value[i]!;
    if (ch === '%') {
      const hex = value.slice(i + 1, i + 3);
      if (!/^[0-9A-Fa-f]{2}$/.test(hex)) throw badUri(`bad percent-encoding in ${attribute}`);
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(...Buffer.from(ch, 'utf8'));
    }
  }
  return Buffer.from(bytes);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Builds `pkcs11:token=...;id=%..;object=...` with RFC 7512 percent-encoding. */
export function formatPkcs11Uri(parts: { token?: string; id?: Buffer; object?: string; type?: string }): string {
  const attrs: string[] = [];
  if (parts.token !== undefined) attrs.push('token=' + pctEncodeText(parts.token));
  if (parts.id !== undefined) attrs.push('id=' + pctEncodeBytes(parts.id));
  if (parts.object !== undefined) attrs.push('object=' + pctEncodeText(parts.object));
  if (parts.type !== undefined) attrs.push('type=' + pctEncodeText(parts.type));
  return 'pkcs11:' + attrs.join(';');
}

/**
 * Parses the path of a PKCS#11 URI. Query attributes (pin-value, module-path, ...) are ignored on
 * purpose: a key reference never carries a PIN or chooses which library to load.
 */
export function parsePkcs11Uri(uri: string): Pkcs11Uri {
  if (typeof uri !== 'string' || !/^pkcs11:/i.test(uri)) throw badUri('does not start with "pkcs11:"');
  const rest = uri.slice('pkcs11:'.length);
  const path = rest.split(/[?#]/, 1)[0]!;
  const seen = new Map<string, Buffer>();
  if (path !== '') {
    for (const segment of path.split(';')) {
      const eq = segment.indexOf('=');
      if (eq <= 0) throw badUri(`attribute ${JSON.stringify(segment)} is not name=value`);
      const name = segment.slice(0, eq).toLowerCase();
      if (!/^[a-z0-9][a-z0-9-]*$/.test(name)) throw badUri(`bad attribute name ${JSON.stringify(name)}`);
      if (seen.has(name)) throw badUri(`attribute ${name} appears twice`);
      seen.set(name, pctDecode(segment.slice(eq + 1), name));
    }
  }
  const text = (name: string, bytes: Buffer): string => {
    try {
      return utf8.decode(bytes);
    } catch {
      throw badUri(`${name} is not valid UTF-8`);
    }
  };
  const attributes = new Map<string, string>();
  let token: string | undefined;
  let object: string | undefined;
  let id: Buffer | undefined;
  let type: string | undefined;
  for (const [name, bytes] of seen) {
    switch (name) {
      case 'token': token = text(name, bytes); break;
      case 'object': object = text(name, bytes); break;
      case 'id': id = bytes; break;
      case 'type': type = text(name, bytes); break;
      default: attributes.set(name, text(name, bytes));
    }
  }
  return { token, object, id, type, attributes };
}

// ---------------------------------------------------------------- algorithm tables

interface CurveInfo {
  readonly curveOid: string;
  /** Bytes per coordinate and per signature integer. */
  readonly fieldSize: number;
  readonly hash: 'sha256' | 'sha384';
}

const EC_CURVES: Partial<Record<KeyAlgorithm, CurveInfo>> = {
  'ecdsa-p256': { curveOid: OID.prime256v1, fieldSize: 32, hash: 'sha256' },
  'ecdsa-p384': { curveOid: OID.secp384r1, fieldSize: 48, hash: 'sha384' },
};

const RSA_BITS: Partial<Record<KeyAlgorithm, number>> = { 'rsa-2048': 2048, 'rsa-3072': 3072 };

// SoftHSM2 2.6 accepts both forms of CKA_EC_PARAMS for Ed25519; PKCS#11 3.0 names both. We write the
// OID (RFC 8410) and read either.
const ED25519_PARAMS_OID = oid(OID.ed25519);
const ED25519_PARAMS_NAME = 'edwards25519';

function algorithmFromEcParams(params: Buffer): KeyAlgorithm | null {
  try {
    if (params[0] === TAG.OID) {
      const curve = decodeOid(params.subarray(readWhole(params, TAG.OID, 'EC parameters').contentStart));
      if (curve === OID.prime256v1) return 'ecdsa-p256';
      if (curve === OID.secp384r1) return 'ecdsa-p384';
      if (curve === OID.ed25519) return 'ed25519';
    } else if (params[0] === TAG.PRINTABLE_STRING) {
      const t = readWhole(params, TAG.PRINTABLE_STRING, 'EC parameters');
      if (params.toString('ascii', t.contentStart, t.end) === ED25519_PARAMS_NAME) return 'ed25519';
    }
  } catch {
    // Explicit curve parameters or garbage: not a curve we sign with.
  }
  return null;
}

/**
 * CKA_EC_POINT is specified as a DER OCTET STRING around the point, but some tokens return the
 * bare point. Tell them apart by the expected bare length.
 */
function unwrapEcPoint(value: Buffer, bareLength: number): Buffer {
  if (value.length === bareLength && (bareLength === 32 || value[0] === 0x04)) return value;
  try {
    const t = readWhole(value, TAG.OCTET_STRING, 'CKA_EC_POINT');
    const point = value.subarray(t.contentStart, t.end);
    if (point.length === bareLength) return point;
  } catch {
    // fall through
  }
  throw new HallmarkError('KEY_BACKEND_FAILED', `token returned an EC point of unexpected form (${value.length} bytes)`);
}

// ---------------------------------------------------------------- shared module state

interface TokenLogin {
  users: number;
  /** HMAC of the PIN that logged in, under a per-process key; never the PIN itself. */
  readonly pinDigest: Buffer;
}

interface LoadedModule {
  readonly path: string;
  readonly pkcs11: PKCS11;
  /** Open backends using this module. */
  users: number;
  /** Whether we called C_Initialize (and so must call C_Finalize). */
  ownsInitialization: boolean;
  /** Logged-in tokens, by slot id (hex). */
  readonly logins: Map<string, TokenLogin>;
}

const loadedModules = new Map<string, LoadedModule>();
const pinDigestKey = randomBytes(32);
const pinDigest = (pin: string): Buffer => createHmac('sha256', pinDigestKey).update(pin, 'utf8').digest();

function acquireModule(modulePath: string): LoadedModule {
  let resolved: string;
  try {
    resolved = realpathSync(modulePath);
  } catch {
    throw new HallmarkError('KEY_BACKEND_FAILED', `PKCS#11 module not found: ${modulePath}`);
  }
  let mod = loadedModules.get(resolved);
  if (!mod) {
    const pkcs11 = new pkcs11js.PKCS11();
    p11(`load of ${modulePath}`, () => pkcs11.load(resolved));
    mod = { path: resolved, pkcs11, users: 0, ownsInitialization: false, logins: new Map() };
    // The library stays loaded for the life of the process: unloading and reloading a module that
    // links OpenSSL is not reliably safe, and re-running C_Initialize on the loaded one is.
    loadedModules.set(resolved, mod);
  }
  if (mod.users === 0) {
    try {
      // OS locking: pkcs11js runs the *Async calls on libuv worker threads.
      mod.pkcs11.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
      mod.ownsInitialization = true;
    } catch (err) {
      if (ckrName(err) !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') throw backendError('C_Initialize', err);
      mod.ownsInitialization = false; // someone else in this process initialised it; leave it to them
    }
  }
  mod.users++;
  return mod;
}

function releaseModule(mod: LoadedModule): void {
  mod.users--;
  if (mod.users > 0) return;
  mod.logins.clear();
  if (mod.ownsInitialization) {
    try {
      mod.pkcs11.C_Finalize();
    } catch {
      // Best effort: nothing useful to do if finalisation fails at shutdown.
    }
    mod.ownsInitialization = false;
  }
}

// ---------------------------------------------------------------- attribute helpers

const littleEndian = endianness() === 'LE';

function readUlong(value: Buffer): number {
  if (value.length === 8) return Number(littleEndian ? value.readBigUInt64LE() : value.readBigUInt64BE());
  if (value.length === 4) return littleEndian ? value.readUInt32LE() : value.readUInt32BE();
  throw new HallmarkError('KEY_BACKEND_FAILED', `unexpected CK_ULONG size ${value.length}`);
}

const readBool = (value: Buffer): boolean => value.length > 0 && value[0] !== 0;

/** What keyInfo() reports about a key on the token. */
export interface Pkcs11KeyInfo {
  readonly label: string;
  /** CKA_ID, hex. */
  readonly id: string;
  readonly algorithm: KeyAlgorithm;
  readonly sensitive: boolean;
  readonly extractable: boolean;
  readonly alwaysSensitive: boolean;
  readonly neverExtractable: boolean;
}

interface FoundKey {
  readonly privateKey: Handle;
  readonly publicKey: Handle | null;
  readonly algorithm: KeyAlgorithm;
}

// ---------------------------------------------------------------- backend

export interface Pkcs11BackendOptions {
  /** Path of the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so. */
  readonly module: string;
  /** Token label. */
  readonly token: string;
  /** User PIN. */
  readonly pin: string;
}

export class Pkcs11KeyBackend implements KeyBackend {
  readonly kind = 'pkcs11' as const;
  /** Label of the open token. */
  readonly tokenLabel: string;

  readonly #mod: LoadedModule;
  readonly #slot: Handle;
  readonly #slotKey: string;
  #session: Handle;
  /** Tail of the queue of operations on the session. */
  #tail: Promise<unknown> = Promise.resolve();
  #closing: Promise<void> | null = null;

  private constructor(mod: LoadedModule, slot: Handle, session: Handle, tokenLabel: string) {
    this.#mod = mod;
    this.#slot = slot;
    this.#slotKey = slot.toString('hex');
    this.#session = session;
    this.tokenLabel = tokenLabel;
  }

  /** Loads the module (once per process), finds the token by label, opens a R/W session and logs in. */
  static async open(options: Pkcs11BackendOptions): Promise<Pkcs11KeyBackend> {
    if (typeof options.pin !== 'string' || options.pin === '') throw new HallmarkError('BAD_PASSPHRASE', 'a PKCS#11 user PIN is required');
    const moduleInUse = (loadedModules.get(safeRealpath(options.module))?.users ?? 0) > 0;
    const mod = acquireModule(options.module);
    let session: Handle | null = null;
    try {
      const slot = findSlot(mod, options.token, moduleInUse);
      session = p11('C_OpenSession', () => mod.pkcs11.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION));
      login(mod, slot.toString('hex'), session, options.token, options.pin);
      return new Pkcs11KeyBackend(mod, slot, session, options.token);
    } catch (err) {
      if (session) {
        try { mod.pkcs11.C_CloseSession(session); } catch { /* already failing */ }
      }
      releaseModule(mod);
      throw err;
    }
  }

  async generateKey(label: string, algorithm: KeyAlgorithm): Promise<KeyRef> {
    if (typeof label !== 'string') throw new HallmarkError('BAD_REQUEST', 'key label must be a string');
    if (!(KEY_ALGORITHMS as readonly string[]).includes(algorithm)) {
      throw new HallmarkError('UNSUPPORTED_ALGORITHM', `unknown key algorithm ${JSON.stringify(algorithm)}`);
    }
    const id = randomBytes(CKA_ID_LENGTH);
    const labelBytes = Buffer.from(label, 'utf8');
    const common: Template = [
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_ID, value: id },
      { type: pkcs11js.CKA_LABEL, value: labelBytes },
    ];
    const publicTemplate: Template = [...common, { type: pkcs11js.CKA_PRIVATE, value: false }, { type: pkcs11js.CKA_VERIFY, value: true }];
    const privateTemplate: Template = [
      ...common,
      { type: pkcs11js.CKA_PRIVATE, value: true },
      { type: pkcs11js.CKA_SENSITIVE, value: true },
      { type: pkcs11js.CKA_EXTRACTABLE, value: false },
      { type: pkcs11js.CKA_SIGN, value: true },
      { type: pkcs11js.CKA_DECRYPT, value: false },
      { type: pkcs11js.CKA_UNWRAP, value: false },
      { type: pkcs11js.CKA_DERIVE, value: false },
    ];
    let mechanism: number;
    const curve = EC_CURVES[algorithm];
    const rsaBits = RSA_BITS[algorithm];
    if (curve) {
      mechanism = pkcs11js.CKM_EC_KEY_PAIR_GEN;
      publicTemplate.push({ type: pkcs11js.CKA_EC_PARAMS, value: oid(curve.curveOid) });
    } else if (algorithm === 'ed25519') {
      mechanism = CKM_EC_EDWARDS_KEY_PAIR_GEN;
      publicTemplate.push({ type: pkcs11js.CKA_EC_PARAMS, value: ED25519_PARAMS_OID });
    } else if (rsaBits) {
      mechanism = pkcs11js.CKM_RSA_PKCS_KEY_PAIR_GEN;
      publicTemplate.push({ type: pkcs11js.CKA_MODULUS_BITS, value: rsaBits }, { type: pkcs11js.CKA_PUBLIC_EXPONENT, value: RSA_PUBLIC_EXPONENT });
    } else {
      throw new HallmarkError('UNSUPPORTED_ALGORITHM', `no PKCS#11 mechanism for ${algorithm}`);
    }

    await this.#exclusive(async () => {
      const session = this.#session;
      const pair = await p11Async('C_GenerateKeyPair', () =>
        this.#pkcs11.C_GenerateKeyPairAsync(session, { mechanism }, publicTemplate, privateTemplate));
      // Tokens may silently ignore template attributes; a CA key that could be exported is refused.
      const [sensitive, extractable] = p11('C_GetAttributeValue', () =>
        this.#pkcs11.C_GetAttributeValue(session, pair.privateKey, [{ type: pkcs11js.CKA_SENSITIVE }, { type: pkcs11js.CKA_EXTRACTABLE }]));
      if (!readBool(sensitive!.value) || readBool(extractable!.value)) {
        try {
          this.#pkcs11.C_DestroyObject(session, pair.privateKey);
          this.#pkcs11.C_DestroyObject(session, pair.publicKey);
        } catch { /* reported below */ }
        throw new HallmarkError('KEY_BACKEND_FAILED', 'token did not create the private key as sensitive and non-extractable');
      }
    });
    return { backend: 'pkcs11', id: formatPkcs11Uri({ token: this.tokenLabel, id, object: label }), algorithm };
  }

  async signer(ref: KeyRef): Promise<Signer> {
    const { found, publicKeySpki } = await this.#exclusive(async () => {
      const key = this.#findKey(ref);
      return { found: key, publicKeySpki: this.#publicKeySpki(key) };
    });
    // Refuse a key whose public half Node cannot import: its signatures could not be checked either.
    publicKeyFromSpki(publicKeySpki);

    const backend = this;
    const algorithm = found.algorithm;
    const curve = EC_CURVES[algorithm];
    const frozenRef: KeyRef = Object.freeze({ backend: 'pkcs11', id: ref.id, algorithm });
    const modulusBytes = RSA_BITS[algorithm] ? signatureLengthForRsa(publicKeySpki) : 0;
    return Object.freeze({
      ref: frozenRef,
      publicKeySpki,
      async sign(data: Buffer): Promise<Buffer> {
        if (!Buffer.isBuffer(data)) throw new HallmarkError('BAD_REQUEST', 'data to sign must be a Buffer');
        let mechanism: number;
        let input: Buffer;
        let outputLength: number;
        if (curve) {
          // CKM_ECDSA signs a digest; hashing here keeps the data off the token and works on tokens
          // without the combined CKM_ECDSA_SHA384 mechanism.
          mechanism = pkcs11js.CKM_ECDSA;
          input = createHash(curve.hash).update(data).digest();
          outputLength = 2 * curve.fieldSize;
        } else if (algorithm === 'ed25519') {
          mechanism = CKM_EDDSA; // no parameters: pure Ed25519, as X.509 (RFC 8410) requires
          input = data;
          outputLength = 64;
        } else {
          mechanism = pkcs11js.CKM_SHA256_RSA_PKCS;
          input = data;
          outputLength = modulusBytes;
        }
        const signature = await backend.#exclusive(async () => {
          const session = backend.#session;
          try {
            backend.#pkcs11.C_SignInit(session, { mechanism }, found.privateKey);
            return await backend.#pkcs11.C_SignAsync(session, nonNullBuffer(input), Buffer.alloc(outputLength));
          } catch (err) {
            // Tokens do not reliably end the operation when C_Sign fails (SoftHSM2 leaves it active
            // after CKR_ARGUMENTS_BAD), and an active operation blocks every later call on the session.
            backend.#replaceSession();
            const ckr = ckrName(err);
            if (ckr === 'CKR_KEY_HANDLE_INVALID' || ckr === 'CKR_OBJECT_HANDLE_INVALID') {
              throw new HallmarkError('KEY_NOT_FOUND', `the key ${frozenRef.id} is no longer on the token`, { cause: err });
            }
            throw backendError('C_Sign', err);
          }
        });
        if (!curve) return signature;
        if (signature.length !== outputLength) {
          throw new HallmarkError('KEY_BACKEND_FAILED', `token returned a ${signature.length}-byte ECDSA signature, expected ${outputLength}`);
        }
        return ecdsaRawToDer(signature);
      },
    });
  }

  /** Reports where a key stands on the token (label, protection flags); never key material. */
  async keyInfo(ref: KeyRef): Promise<Pkcs11KeyInfo> {
    return this.#exclusive(async () => {
      const found = this.#findKey(ref);
      const get = (type: number): Buffer =>
        p11('C_GetAttributeValue', () => this.#pkcs11.C_GetAttributeValue(this.#session, found.privateKey, [{ type }])[0]!.value);
      return {
        label: get(pkcs11js.CKA_LABEL).toString('utf8'),
        id: get(pkcs11js.CKA_ID).toString('hex'),
        algorithm: found.algorithm,
        sensitive: readBool(get(pkcs11js.CKA_SENSITIVE)),
        extractable: readBool(get(pkcs11js.CKA_EXTRACTABLE)),
        alwaysSensitive: readBool(get(pkcs11js.CKA_ALWAYS_SENSITIVE)),
        neverExtractable: readBool(get(pkcs11js.CKA_NEVER_EXTRACTABLE)),
      };
    });
  }

  /** Logs out (when the last backend on this token closes), closes the session, finalises the module when unused. Idempotent. */
  close(): Promise<void> {
    // Queued behind operations already started; anything called after this point is refused.
    this.#closing ??= this.#tail.then(
      () => this.#shutdown(),
      () => this.#shutdown(),
    );
    return this.#closing;
  }

  // ------------------------------------------------------------ internals

  get #pkcs11(): PKCS11 {
    return this.#mod.pkcs11;
  }

  /** Runs `fn` after every operation queued before it: one session runs one operation at a time. */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closing) return Promise.reject(new HallmarkError('KEY_BACKEND_FAILED', 'PKCS#11 backend is closed'));
    const result = this.#tail.then(fn);
    this.#tail = result.then(() => undefined, () => undefined);
    return result;
  }

  /**
   * Swaps the session for a fresh one. The new session opens before the old one closes so that the
   * token never has zero sessions, which would end the login. Object handles stay valid: they
   * belong to the application, not the session.
   */
  #replaceSession(): void {
    try {
      const fresh = this.#pkcs11.C_OpenSession(this.#slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
      const old = this.#session;
      this.#session = fresh;
      try { this.#pkcs11.C_CloseSession(old); } catch { /* already unusable */ }
    } catch {
      // Keep the old session; the next call reports whatever is wrong with the token.
    }
  }

  #shutdown(): void {
    const pkcs11 = this.#pkcs11;
    const loginState = this.#mod.logins.get(this.#slotKey);
    if (loginState) {
      loginState.users--;
      if (loginState.users === 0) {
        this.#mod.logins.delete(this.#slotKey);
        // C_Logout ends the login for every session of this process on the token, hence the count.
        try { pkcs11.C_Logout(this.#session); } catch { /* not logged in any more: fine */ }
      }
    }
    try { pkcs11.C_CloseSession(this.#session); } catch { /* session already gone: fine */ }
    releaseModule(this.#mod);
  }

  #findObjects(template: Template): Handle[] {
    const pkcs11 = this.#pkcs11;
    const session = this.#session;
    return p11('C_FindObjects', () => {
      pkcs11.C_FindObjectsInit(session, template);
      try {
        return pkcs11.C_FindObjects(session, 2); // two are enough to notice an ambiguous id
      } finally {
        pkcs11.C_FindObjectsFinal(session);
      }
    });
  }

  /** Resolves a KeyRef to the private (and, when present, public) object and checks its algorithm. */
  #findKey(ref: KeyRef): FoundKey {
    if (ref.backend !== 'pkcs11') throw new HallmarkError('KEY_NOT_FOUND', `key reference is for the ${ref.backend} backend, not pkcs11`);
    const uri = parsePkcs11Uri(ref.id);
    if (!uri.id || uri.id.length === 0) throw new HallmarkError('KEY_NOT_FOUND', 'PKCS#11 key reference has no id attribute');
    if (uri.token !== undefined && uri.token !== this.tokenLabel) {
      throw new HallmarkError('KEY_NOT_FOUND', `key is on token ${JSON.stringify(uri.token)}, but this backend has token ${JSON.stringify(this.tokenLabel)} open`);
    }
    if (uri.type !== undefined && uri.type !== 'private') {
      throw new HallmarkError('KEY_NOT_FOUND', `PKCS#11 key reference names a ${uri.type} object, not a private key`);
    }
    const idHex = uri.id.toString('hex');
    const privateKeys = this.#findObjects([{ type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PRIVATE_KEY }, { type: pkcs11js.CKA_ID, value: uri.id }]);
    if (privateKeys.length === 0) throw new HallmarkError('KEY_NOT_FOUND', `no private key with id ${idHex} on token ${JSON.stringify(this.tokenLabel)}`);
    if (privateKeys.length > 1) throw new HallmarkError('KEY_BACKEND_FAILED', `several private keys share id ${idHex} on token ${JSON.stringify(this.tokenLabel)}`);
    const privateKey = privateKeys[0]!;
    const publicKey = this.#findObjects([{ type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PUBLIC_KEY }, { type: pkcs11js.CKA_ID, value: uri.id }])[0] ?? null;

    const algorithm = this.#algorithmOf(privateKey, publicKey);
    if (algorithm === null) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `key ${idHex} on the token is of an unsupported type`);
    if (algorithm !== ref.algorithm) {
      throw new HallmarkError('KEY_NOT_FOUND', `key ${idHex} on the token is ${algorithm}, but the reference says ${ref.algorithm}`);
    }
    return { privateKey, publicKey, algorithm };
  }

  #attribute(handle: Handle, type: number): Buffer | null {
    try {
      return this.#pkcs11.C_GetAttributeValue(this.#session, handle, [{ type }])[0]!.value;
    } catch (err) {
      const ckr = ckrName(err);
      if (ckr === 'CKR_ATTRIBUTE_TYPE_INVALID' || ckr === 'CKR_ATTRIBUTE_SENSITIVE') return null;
      throw backendError('C_GetAttributeValue', err);
    }
  }

  #algorithmOf(privateKey: Handle, publicKey: Handle | null): KeyAlgorithm | null {
    const keyTypeValue = this.#attribute(privateKey, pkcs11js.CKA_KEY_TYPE);
    if (!keyTypeValue) return null;
    const keyType = readUlong(keyTypeValue);
    if (keyType === pkcs11js.CKK_EC || keyType === CKK_EC_EDWARDS) {
      const params = (publicKey && this.#attribute(publicKey, pkcs11js.CKA_EC_PARAMS)) ?? this.#attribute(privateKey, pkcs11js.CKA_EC_PARAMS);
      const alg = params ? algorithmFromEcParams(params) : null;
      if (alg === null) return null;
      // Key type and curve must agree (CKK_EC with an Edwards curve is a malformed object).
      return (alg === 'ed25519') === (keyType === CKK_EC_EDWARDS) ? alg : null;
    }
    if (keyType === pkcs11js.CKK_RSA) {
      // The modulus is public on both objects; the private object covers tokens that keep no public key.
      const modulus = (publicKey && this.#attribute(publicKey, pkcs11js.CKA_MODULUS)) ?? this.#attribute(privateKey, pkcs11js.CKA_MODULUS);
      if (!modulus) return null;
      const bits = bitLength(modulus);
      if (bits === 2048) return 'rsa-2048';
      if (bits === 3072) return 'rsa-3072';
    }
    return null;
  }

  #publicKeySpki(found: FoundKey): Buffer {
    const { algorithm, publicKey, privateKey } = found;
    if (RSA_BITS[algorithm]) {
      const source = publicKey ?? privateKey;
      const n = this.#attribute(source, pkcs11js.CKA_MODULUS);
      const e = this.#attribute(source, pkcs11js.CKA_PUBLIC_EXPONENT);
      if (!n || !e) throw new HallmarkError('KEY_NOT_FOUND', 'RSA public key (modulus, exponent) is not readable on the token');
      return createPublicKey({ key: { kty: 'RSA', n: stripZeros(n).toString('base64url'), e: stripZeros(e).toString('base64url') }, format: 'jwk' })
        .export({ type: 'spki', format: 'der' });
    }
    // EC private objects carry no point, so the public object is needed.
    const pointValue = publicKey && this.#attribute(publicKey, pkcs11js.CKA_EC_POINT);
    if (!pointValue) throw new HallmarkError('KEY_NOT_FOUND', 'the public key object for this key is missing from the token');
    if (algorithm === 'ed25519') {
      return seq(seq(oid(OID.ed25519)), bitString(unwrapEcPoint(pointValue, 32)));
    }
    const curve = EC_CURVES[algorithm]!;
    const point = unwrapEcPoint(pointValue, 1 + 2 * curve.fieldSize);
    return seq(seq(oid(OID.ecPublicKey), oid(curve.curveOid)), bitString(point));
  }
}

// ---------------------------------------------------------------- open() helpers

function safeRealpath(p: string): string {
  try {
    return realpathSync(p);
  } catch {
    return p;
  }
}

function findSlot(mod: LoadedModule, tokenLabel: string, moduleWasInUse: boolean): Handle {
  const pkcs11 = mod.pkcs11;
  const slots = p11('C_GetSlotList', () => pkcs11.C_GetSlotList(true));
  const labels: string[] = [];
  const matches: Handle[] = [];
  for (const slot of slots) {
    const info = p11('C_GetTokenInfo', () => pkcs11.C_GetTokenInfo(slot));
    if (!(info.flags & pkcs11js.CKF_TOKEN_INITIALIZED)) continue;
    const label = info.label.replace(/[ \0]+$/, ''); // labels are blank-padded to 32 bytes
    labels.push(label);
    if (label === tokenLabel) {
      if (!(info.flags & pkcs11js.CKF_USER_PIN_INITIALIZED)) {
        throw new HallmarkError('KEY_BACKEND_FAILED', `PKCS#11 token ${JSON.stringify(tokenLabel)} has no user PIN set`);
      }
      matches.push(slot);
    }
  }
  if (matches.length === 1) return matches[0]!;
  if (matches.length > 1) throw new HallmarkError('KEY_BACKEND_FAILED', `several PKCS#11 tokens are labelled ${JSON.stringify(tokenLabel)}`);
  // SoftHSM2 (and others) read their token list at C_Initialize: a token created while another
  // backend in this process keeps the module initialised stays invisible until all have closed.
  const hint = moduleWasInUse ? ' (tokens created after the module was initialised appear only once every backend using it has closed)' : '';
  throw new HallmarkError('KEY_BACKEND_FAILED', `no PKCS#11 token labelled ${JSON.stringify(tokenLabel)} in ${mod.path}; tokens: ${labels.map((l) => JSON.stringify(l)).join(', ') || 'none'}${hint}`);
}

function login(mod: LoadedModule, slotKey: string, session: Handle, tokenLabel: string, pin: string): void {
  const digest = pinDigest(pin);
  const existing = mod.logins.get(slotKey);
  if (existing) {
    // Already logged in by another backend: C_Login cannot check the PIN now, so compare digests.
    if (!timingSafeEqual(existing.pinDigest, digest)) throw wrongPin(tokenLabel);
    existing.users++;
    return;
  }
  try {
    mod.pkcs11.C_Login(session, pkcs11js.CKU_USER, pin);
  } catch (err) {
    const ckr = ckrName(err);
    if (ckr === 'CKR_PIN_INCORRECT' || ckr === 'CKR_PIN_INVALID' || ckr === 'CKR_PIN_LEN_RANGE') throw wrongPin(tokenLabel);
    if (ckr === 'CKR_PIN_LOCKED') throw new HallmarkError('KEY_BACKEND_FAILED', `the user PIN of PKCS#11 token ${JSON.stringify(tokenLabel)} is locked`);
    // Logged in by code outside this module's bookkeeping: the PIN cannot be checked, but the
    // process already holds the login, so refusing would protect nothing.
    if (ckr !== 'CKR_USER_ALREADY_LOGGED_IN') {
      throw new HallmarkError('KEY_BACKEND_FAILED', `PKCS#11 C_Login failed: ${ckr ?? 'native error'}`); // no cause: keep the call away from logs
    }
  }
  mod.logins.set(slotKey, { users: 1, pinDigest: digest });
}

const wrongPin = (tokenLabel: string): HallmarkError =>
  new HallmarkError('BAD_PASSPHRASE', `wrong PIN for PKCS#11 token ${JSON.stringify(tokenLabel)}`);

// ---------------------------------------------------------------- small helpers

/**
 * pkcs11js passes an empty Buffer as a NULL pointer, which tokens reject (CKR_ARGUMENTS_BAD). A
 * zero-length view into a real allocation passes a valid pointer with length 0.
 */
function nonNullBuffer(data: Buffer): Buffer {
  return data.length > 0 ? data : Buffer.alloc(1).subarray(0, 0);
}

function stripZeros(b: Buffer): Buffer {
  let i = 0;
  while (i < b.length - 1 && b[i] === 0) i++;
  return b.subarray(i);
}

function bitLength(b: Buffer): number {
  const m = stripZeros(b);
  if (m.length === 0 || (m.length === 1 && m[0] === 0)) return 0;
  return (m.length - 1) * 8 + (32 - Math.clz32(m[0]!));
}

function signatureLengthForRsa(spki: Buffer): number {
  const bits = createPublicKey({ key: spki, format: 'der', type: 'spki' }).asymmetricKeyDetails?.modulusLength ?? 0;
  return Math.ceil(bits / 8);
}
