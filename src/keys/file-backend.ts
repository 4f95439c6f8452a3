// Keys encrypted at rest under a passphrase.
//
// Layout of a key directory:
//   keystore.json     scrypt parameters + a random 256-bit data key wrapped (AES-256-GCM) by the
//                     passphrase-derived key. One scrypt per process, whatever the number of keys.
//   <id>.key.json     one key: algorithm, public key, and its PKCS#8 DER encrypted with AES-256-GCM
//                     under the data key, bound (GCM AAD) to its id, algorithm and public key.
// No private key is ever written in clear; the files contain no PEM private-key block.

import { createCipheriv, createDecipheriv, createHash, createPrivateKey, hkdfSync, createPublicKey, generateKeyPair, randomBytes, scrypt, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { mkdir, readFile, rename, writeFile, access } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { HallmarkError } from '../errors.js';
import { KEY_ALGORITHMS, signingSchemeFor, type KeyAlgorithm } from '../pki/algorithms.js';
import type { KeyBackend, KeyRef, Signer } from './key-backend.js';

const scryptAsync = promisify(scrypt) as (password: string, salt: Buffer, keylen: number, options: { N: number; r: number; p: number; maxmem: number }) => Promise<Buffer>;
const generateKeyPairAsync = promisify(generateKeyPair);

/** scrypt cost: N = 2^17, r = 8 (128 MiB, a few hundred ms): the OWASP recommendation for scrypt. */
const SCRYPT = { N: 1 << 17, r: 8, p: 1 } as const;
const KEYSTORE_FILE = 'keystore.json';
const MAX_KEY_FILE = 64 * 1024;

interface KeystoreFile {
  version: 1;
  kdf: { name: 'scrypt'; N: number; r: number; p: number; salt: string };
  wrappedDataKey: { iv: string; ciphertext: string; tag: string };
}

interface KeyFile {
  version: 1;
  id: string;
  label: string;
  algorithm: KeyAlgorithm;
  publicKeySpki: string;
  encryptedPkcs8: { iv: string; ciphertext: string; tag: string };
}

function seal(key: Buffer, plaintext: Buffer, aad: Buffer): { iv: string; ciphertext: string; tag: string } {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  cipher.setAAD(aad);
  const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return { iv: iv.toString('base64'), ciphertext: ciphertext.toString('base64'), tag: cipher.getAuthTag().toString('base64') };
}

function open(key: Buffer, box: { iv: string; ciphertext: string; tag: string }, aad: Buffer): Buffer {
  const decipher = createDecipheriv('aes-256-gcm', key, Buffer.from(box.iv, 'base64'));
  decipher.setAAD(aad);
  decipher.setAuthTag(Buffer.from(box.tag, 'base64'));
  return Buffer.concat([decipher.update(Buffer.from(box.ciphertext, 'base64')), decipher.final()]);
}

function keyAad(id: string, algorithm: string, spki: string): Buffer {
  return Buffer.from(`hallmark-key-v1|${id}|${algorithm}|${createHash('sha256').update(spki).digest('hex')}`);
}

async function exists(path: string): Promise<boolean> {
  try { await access(path); return true; } catch { return false; }
}

/** Writes a file atomically with owner-only permissions. */
async function writePrivateFile(path: string, data: string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await writeFile(tmp, data, { mode: 0o600, flag: 'wx' });
  await rename(tmp, path);
}

function generateOptions(algorithm: KeyAlgorithm): [string, object] {
  switch (algorithm) {
    case 'ecdsa-p256': return ['ec', { namedCurve: 'prime256v1' }];
    case 'ecdsa-p384': return ['ec', { namedCurve: 'secp384r1' }];
    case 'ed25519': return ['ed25519', {}];
    case 'rsa-2048': return ['rsa', { modulusLength: 2048, publicExponent: 0x10001 }];
    case 'rsa-3072': return ['rsa', { modulusLength: 3072, publicExponent: 0x10001 }];
  }
}

export class FileKeyBackend implements KeyBackend {
  readonly kind = 'file' as const;
  readonly #dir: string;
  readonly #dataKey: Buffer;
  readonly #open = new Map<string, KeyObject>();

  private constructor(dir: string, dataKey: Buffer) {
    this.#dir = dir;
    this.#dataKey = dataKey;
  }

  static async exists(dir: string): Promise<boolean> {
    return exists(join(dir, KEYSTORE_FILE));
  }

  /** Creates a new key store in `dir` (which must not hold one). */
  static async create(dir: string, passphrase: string): Promise<FileKeyBackend> {
    if (!passphrase) throw new HallmarkError('PASSPHRASE_REQUIRED', 'a passphrase is required to create the key store');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    if (await exists(join(dir, KEYSTORE_FILE))) throw new HallmarkError('ALREADY_INITIALISED', `${dir} already holds a key store`);
    const salt = randomBytes(16);
    const kek = await scryptAsync(passphrase, salt, 32, { ...SCRYPT, maxmem: 256 * 1024 * 1024 });
    const dataKey = randomBytes(32);
    const file: KeystoreFile = {
      version: 1,
      kdf: { name: 'scrypt', ...SCRYPT, salt: salt.toString('base64') },
      wrappedDataKey: seal(kek, dataKey, Buffer.from('hallmark-keystore-v1')),
    };
    await writePrivateFile(join(dir, KEYSTORE_FILE), JSON.stringify(file, null, 2) + '\n');
    return new FileKeyBackend(dir, dataKey);
  }

  /** Opens an existing key store. A wrong passphrase is BAD_PASSPHRASE. */
  static async open(dir: string, passphrase: string): Promise<FileKeyBackend> {
    if (!passphrase) throw new HallmarkError('PASSPHRASE_REQUIRED', 'a passphrase is required to open the key store (HALLMARK_PASSPHRASE or --passphrase-file)');
    let file: KeystoreFile;
    try {
      file = JSON.parse(await readFile(join(dir, KEYSTORE_FILE), 'utf8')) as KeystoreFile;
    } catch (err) {
      throw new HallmarkError('NOT_INITIALISED', `no key store in ${dir}`, { cause: err });
    }
    if (file.version !== 1 || file.kdf?.name !== 'scrypt') throw new HallmarkError('KEY_BACKEND_FAILED', `unsupported key store format in ${dir}`);
    const { N, r, p } = file.kdf;
    const kek = await scryptAsync(passphrase, Buffer.from(file.kdf.salt, 'base64'), 32, { N, r, p, maxmem: 256 * 1024 * 1024 });
    try {
      return new FileKeyBackend(dir, open(kek, file.wrappedDataKey, Buffer.from('hallmark-keystore-v1')));
    } catch {
      throw new HallmarkError('BAD_PASSPHRASE', 'wrong passphrase for the key store');
    }
  }

  async generateKey(label: string, algorithm: KeyAlgorithm): Promise<KeyRef> {
    if (!KEY_ALGORITHMS.includes(algorithm)) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `unsupported key algorithm ${algorithm}`);
    const [type, options] = generateOptions(algorithm);
    const { privateKey, publicKey } = await (generateKeyPairAsync as (t: string, o: object) => Promise<{ privateKey: KeyObject; publicKey: KeyObject }>)(type, options);
    const id = randomBytes(16).toString('hex');
    const spki = publicKey.export({ type: 'spki', format: 'der' }).toString('base64');
    const pkcs8 = privateKey.export({ type: 'pkcs8', format: 'der' });
    const file: KeyFile = { version: 1, id, label, algorithm, publicKeySpki: spki, encryptedPkcs8: seal(this.#dataKey, pkcs8, keyAad(id, algorithm, spki)) };
    pkcs8.fill(0);
    await writePrivateFile(join(this.#dir, `${id}.key.json`), JSON.stringify(file, null, 2) + '\n');
    this.#open.set(id, privateKey);
    return { backend: 'file', id, algorithm };
  }

  async #privateKey(ref: KeyRef): Promise<{ key: KeyObject; spki: Buffer }> {
    if (ref.backend !== 'file' || !/^[0-9a-f]{32}$/.test(ref.id)) throw new HallmarkError('KEY_NOT_FOUND', `not a file key reference: ${ref.backend}:${ref.id}`);
    let text: string;
    try {
      text = await readFile(join(this.#dir, `${ref.id}.key.json`), 'utf8');
    } catch (err) {
      throw new HallmarkError('KEY_NOT_FOUND', `no key ${ref.id} in ${this.#dir}`, { cause: err });
    }
    if (text.length > MAX_KEY_FILE) throw new HallmarkError('KEY_BACKEND_FAILED', `key file ${ref.id} is too large`);
    const file = JSON.parse(text) as KeyFile;
    if (file.id !== ref.id || file.algorithm !== ref.algorithm) throw new HallmarkError('KEY_BACKEND_FAILED', `key file ${ref.id} does not match its reference`);
    const spki = Buffer.from(file.publicKeySpki, 'base64');
    let key = this.#open.get(ref.id);
    if (!key) {
      let pkcs8: Buffer;
      try {
        pkcs8 = open(this.#dataKey, file.encryptedPkcs8, keyAad(file.id, file.algorithm, file.publicKeySpki));
      } catch {
        throw new HallmarkError('KEY_BACKEND_FAILED', `key file ${ref.id} fails its integrity check (altered, or from another key store)`);
      }
      key = createPrivateKey({ key: pkcs8, format: 'der', type: 'pkcs8' });
      pkcs8.fill(0);
      const derived = createPublicKey(key).export({ type: 'spki', format: 'der' });
      if (!derived.equals(spki)) throw new HallmarkError('KEY_BACKEND_FAILED', `key file ${ref.id}: private key does not match its public key`);
      this.#open.set(ref.id, key);
    }
    return { key, spki };
  }

  async signer(ref: KeyRef): Promise<Signer> {
    const { key, spki } = await this.#privateKey(ref);
    const hash = signingSchemeFor(ref.algorithm).hash;
    return {
      ref,
      publicKeySpki: spki,
      // The callback form of crypto.sign runs on the libuv thread pool, so concurrent issuances use
      // both cores without worker threads.
      sign: (data: Buffer) => new Promise<Buffer>((resolve, reject) => {
        cryptoSign(hash, data, key, (err, sig) => (err ? reject(new HallmarkError('KEY_BACKEND_FAILED', 'signing failed', { cause: err })) : resolve(sig)));
      }),
    };
  }

  /**
   * The private key as a KeyObject, in memory only. For the TLS server key, which Node's TLS stack
   * must hold itself; CA keys are only ever used through signer().
   */
  async privateKeyObject(ref: KeyRef): Promise<KeyObject> {
    return (await this.#privateKey(ref)).key;
  }

  /**
   * A 256-bit key for one purpose, derived (HKDF-SHA256) from the key store's data key: data the
   * authority must keep encrypted at rest for a while (a stamp run's secrets until their files are
   * written) without a key of its own. Different purposes give independent keys; only a process
   * holding the passphrase can derive them.
   */
  deriveKey(purpose: string): Buffer {
    return Buffer.from(hkdfSync('sha256', this.#dataKey, Buffer.from('hallmark-keystore-derived-v1'), Buffer.from(purpose, 'utf8'), 32));
  }

  async close(): Promise<void> {
    this.#open.clear();
  }
}
