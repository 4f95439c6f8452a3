// Microchip Trust&GO / TrustFLEX / TNGLORA manifests: a JSON array of JWS objects in the general JSON
// serialisation, {protected, payload, header: {uniqueId}, signature}, each signed ES256 by a Microchip
// manifest ("log") signer. The payload names the chip (uniqueId) and its keys (publicKeySet.keys[],
// JWKs on P-256, the device key with an x5c chain: device certificate, then the Microchip signer CA).
//
// Per entry, in this order: the signer (protected header x5t#S256, else kid) is one of the --trust
// certificates; alg is ES256; the signature verifies over "<protected>.<payload>"; uniqueId is hex;
// the device key is a valid P-256 point; x5c[0], when present, carries that key. Only then is the
// entry a device: UDID = uniqueId (lowercase hex), key = the JWK as SPKI, birth certificate = x5c[0],
// chain = x5c[1..].

import { verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { EntryError, birthChecked, checkCertificateKey, checkUdid, decodeBase64, decodeBase64Url, entryFailure, type BirthCheck, type ManifestDevice, type ParsedEntry } from './entries.js';
import { jsonArrayElements, type ArrayElement } from './json-array.js';
import { P256_SPKI_PREFIX, isP256Point } from '../../pki/p256.js';
import type { ManifestSigner } from './signers.js';

export interface MicrochipOptions {
  readonly signers: readonly ManifestSigner[];
  /** Do not read x5c at all: register the JWS-attested key only, with no birth certificate. */
  readonly ignoreBirthCertificates: boolean;
  readonly checkBirth: BirthCheck;
  /** Called once per distinct signer actually used. */
  readonly onSigner?: (signer: ManifestSigner) => void;
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

function parseJsonPart(buf: Buffer, what: string, udid?: string): Record<string, unknown> {
  let v: unknown;
  try { v = JSON.parse(buf.toString('utf8')); } catch { throw new EntryError(`the ${what} is not JSON`, udid); }
  if (!isObject(v)) throw new EntryError(`the ${what} is not a JSON object`, udid);
  return v;
}

/** Picks the signer named by a protected header; memoised per distinct header (a manifest has one or two). */
function signerSelector(signers: readonly ManifestSigner[]): (protectedB64: string, udid?: string) => ManifestSigner {
  const memo = new Map<string, ManifestSigner | EntryError>();
  const select = (protectedB64: string, udid?: string): ManifestSigner => {
    const header = parseJsonPart(decodeBase64Url(protectedB64, 'protected header', udid), 'protected header', udid);
    if (header.alg !== 'ES256') throw new EntryError(`the signature algorithm is ${JSON.stringify(header.alg)}; Microchip manifests are signed ES256`, udid);
    if (header.crit !== undefined) throw new EntryError('the protected header has "crit" extensions, which are not supported', udid);
    const x5t = header['x5t#S256'];
    const kid = header.kid;
    if (x5t !== undefined && typeof x5t !== 'string') throw new EntryError('x5t#S256 is not a string', udid);
    if (kid !== undefined && typeof kid !== 'string') throw new EntryError('kid is not a string', udid);
    if (x5t === undefined && kid === undefined) throw new EntryError('the protected header names no signer (neither x5t#S256 nor kid)', udid);
    const candidates = signers.filter((s) => s.certificate && s.keyType === 'ec-p256');
    const signer = x5t !== undefined ? candidates.find((s) => s.x5tS256 === x5t) : candidates.find((s) => s.kid === kid);
    const named = [x5t !== undefined ? `x5t#S256 ${x5t}` : '', kid !== undefined ? `kid ${kid}` : ''].filter(Boolean).join(', ');
    if (!signer) throw new EntryError(`signed by an unknown signer (${named}); give its certificate with --trust`, udid);
    if (x5t !== undefined && kid !== undefined && signer.kid !== undefined && signer.kid !== kid) {
      throw new EntryError(`the protected header's kid ${kid} and x5t#S256 ${x5t} name different certificates`, udid);
    }
    return signer;
  };
  return (protectedB64, udid) => {
    let r = memo.get(protectedB64);
    if (r === undefined) {
      try { r = select(protectedB64); } catch (err) { if (err instanceof EntryError) r = err; else throw err; }
      if (memo.size < 64) memo.set(protectedB64, r);
    }
    if (r instanceof EntryError) throw new EntryError(r.message, udid);
    return r;
  };
}

/** Which key of publicKeySet is the device's hardware key: kid "0" when present, else the first key. */
export function deviceKeyOf(keys: readonly unknown[]): unknown {
  return keys.find((k) => isObject(k) && k.kid === '0') ?? keys[0];
}

function jwkToSpki(jwk: unknown, udid: string): Buffer {
  if (!isObject(jwk)) throw new EntryError('the device key is not a JWK object', udid);
  if (jwk.kty !== 'EC' || jwk.crv !== 'P-256') throw new EntryError(`the device key is ${JSON.stringify(jwk.kty)}/${JSON.stringify(jwk.crv)}; expected an EC P-256 JWK`, udid);
  const x = decodeBase64(jwk.x, 'JWK x', udid);
  const y = decodeBase64(jwk.y, 'JWK y', udid);
  if (x.length !== 32 || y.length !== 32) throw new EntryError(`JWK x and y must be 32 bytes each (got ${x.length} and ${y.length})`, udid);
  if (!isP256Point(x, y)) throw new EntryError('the device key (JWK x, y) is not a point on P-256', udid);
  return Buffer.concat([P256_SPKI_PREFIX, x, y]);
}

/** Entries whose signatures are being verified at once (on the libuv thread pool, off the event loop). */
const IN_FLIGHT = 256;

function verifyEs256(input: Buffer, key: KeyObject, signature: Buffer): Promise<boolean> {
  return new Promise((resolve, reject) => {
    cryptoVerify('sha256', input, { key, dsaEncoding: 'ieee-p1363' }, signature, (err, ok) => (err ? reject(err) : resolve(ok)));
  });
}

/** What an entry check learnt before it ended: the signer, once its signature verified. */
interface EntryProgress { signer?: ManifestSigner }

async function entryDevice(value: unknown, selectSigner: ReturnType<typeof signerSelector>, options: MicrochipOptions, progress: EntryProgress): Promise<ManifestDevice> {
  if (!isObject(value)) throw new EntryError('the entry is not a JSON object');
  const hinted = isObject(value.header) && typeof value.header.uniqueId === 'string' ? value.header.uniqueId.toLowerCase().slice(0, 64) : undefined;
  if (typeof value.protected !== 'string' || typeof value.payload !== 'string' || typeof value.signature !== 'string') {
    throw new EntryError('the entry is not a JWS (general JSON serialisation needs "protected", "payload" and "signature")', hinted);
  }
  // 1. Signer and signature, before anything in the payload is believed.
  const signer = selectSigner(value.protected, hinted);
  const signature = decodeBase64Url(value.signature, 'signature', hinted);
  if (signature.length !== 64) throw new EntryError(`the ES256 signature is ${signature.length} bytes; expected 64 (r||s)`, hinted);
  const signingInput = Buffer.from(`${value.protected}.${value.payload}`, 'ascii');
  if (!(await verifyEs256(signingInput, signer.key, signature))) {
    throw new EntryError(`the signature does not verify with signer ${signer.name} (sha256 ${signer.sha256.slice(0, 16)}…)`, hinted);
  }
  progress.signer = signer;
  // 2. The signed payload.
  const payload = parseJsonPart(decodeBase64Url(value.payload, 'payload', hinted), 'payload', hinted);
  if (typeof payload.uniqueId !== 'string') throw new EntryError('the payload has no uniqueId', hinted);
  const udid = checkUdid(payload.uniqueId, 'uniqueId', hinted ?? payload.uniqueId.slice(0, 64));
  if (hinted !== undefined && hinted !== udid) throw new EntryError(`the unprotected header's uniqueId ${hinted} differs from the signed payload's ${udid}`, udid);
  const keySet = payload.publicKeySet;
  if (!isObject(keySet) || !Array.isArray(keySet.keys) || keySet.keys.length === 0) {
    throw new EntryError('the payload has no publicKeySet.keys (a device without a public key cannot be registered)', udid);
  }
  const jwk = deviceKeyOf(keySet.keys);
  const spki = jwkToSpki(jwk, udid);
  const device: { publicKeySpki: Buffer; udid: string; birthCertificate?: Buffer; birthCertificateChain?: Buffer[] } = { publicKeySpki: spki, udid };
  // 3. The birth certificate (x5c on the device key): must carry the JWK and chain to a trusted vendor CA.
  const x5c = (jwk as Record<string, unknown>).x5c;
  if (!options.ignoreBirthCertificates && x5c !== undefined) {
    if (!Array.isArray(x5c)) throw new EntryError('x5c is not an array', udid);
    if (x5c.length > 0) {
      const ders = x5c.map((c, i) => decodeBase64(c, `x5c[${i}]`, udid));
      checkCertificateKey(ders[0]!, spki, udid);
      await birthChecked(options.checkBirth, ders[0]!, ders.slice(1), spki, udid);
      device.birthCertificate = ders[0]!;
      device.birthCertificateChain = ders.slice(1);
    }
  }
  return device;
}

/**
 * Yields every entry of a Microchip manifest, verified, or the reason it is invalid, in file order.
 * Up to IN_FLIGHT entries are checked at once (their signatures verify on the thread pool while the
 * next entries are read); each is yielded only when its own check is complete, and nothing of its
 * payload is read before its signature has verified.
 */
export async function* microchipEntries(chunks: AsyncIterable<Buffer>, options: MicrochipOptions): AsyncGenerator<ParsedEntry> {
  const selectSigner = signerSelector(options.signers);
  const used = new Set<ManifestSigner>();
  interface Pending { readonly index: number; readonly hinted?: string; readonly progress: EntryProgress; readonly device: Promise<ManifestDevice> }
  const pending: Pending[] = [];
  // In file order: signers are reported as they are first used, failures named.
  const settle = async (p: Pending): Promise<ParsedEntry> => {
    let device: ManifestDevice | undefined;
    let failure: unknown;
    try { device = await p.device; } catch (err) { failure = err; }
    const signer = p.progress.signer;
    if (signer && !used.has(signer)) { used.add(signer); options.onSigner?.(signer); }
    if (device) return { ok: true, position: p.index, device };
    const udid = failure instanceof EntryError ? failure.udid ?? p.hinted : p.hinted;
    return entryFailure(`entry ${p.index}${udid ? ` (uniqueId ${udid})` : ''}`, failure);
  };
  const elements = jsonArrayElements(chunks)[Symbol.asyncIterator]();
  try {
    for (;;) {
      let next: IteratorResult<ArrayElement>;
      try {
        next = await elements.next();
      } catch (err) {
        // A structural error after entry n: entries before it are reported first, as they come first.
        while (pending.length > 0) yield await settle(pending.shift()!);
        throw err;
      }
      if (next.done) break;
      const el = next.value;
      const hinted = isObject(el.value) && isObject(el.value.header) && typeof el.value.header.uniqueId === 'string' ? el.value.header.uniqueId : undefined;
      const progress: EntryProgress = {};
      const device = entryDevice(el.value, selectSigner, options, progress);
      device.catch(() => { /* settled in turn, or dropped when the import stops at an earlier entry */ });
      pending.push({ index: el.index, hinted, progress, device });
      if (pending.length >= IN_FLIGHT) yield await settle(pending.shift()!);
    }
    while (pending.length > 0) yield await settle(pending.shift()!);
  } finally {
    await elements.return?.(undefined);
  }
}
