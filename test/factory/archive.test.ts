// The encrypted, signed stamp archive: round trips (many small files, files spanning chunks), flat
// memory in the number of files, and refusal of everything else: another factory's key, any flipped
// byte, any truncation, an untrusted or expired signer, a file changed between the two passes.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, randomBytes, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { after, describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { ARCHIVE_LIMITS, createArchiveWriter, factoryKeyFingerprint, openArchive, type ArchiveEntry } from '../../src/factory/archive.js';
import { makeTempDir } from '../helpers/tmp.js';
import { makeCa, makePki, signerOf, spkiOf, type Pki } from './stamp-fixtures.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const tmp = await makeTempDir('hallmark-archive-');
after(() => tmp.cleanup());
let seq = 0;
const path = (name = 'a') => join(tmp.path, `${name}-${++seq}.hsa`);

const pki = makePki('ecdsa-p256', 'OEM');
const factory = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
const factorySpki = spkiOf(factory.privateKey);

async function write(file: string, entries: Iterable<ArchiveEntry>, options: { pki?: Pki; chain?: Buffer[]; signer?: ReturnType<typeof signerOf>; recipient?: Buffer; info?: object } = {}) {
  const p = options.pki ?? pki;
  const writer = await createArchiveWriter({
    path: file,
    recipientPublicKeySpki: options.recipient ?? factorySpki,
    signer: options.signer ?? signerOf(p.issuing),
    signerCertificateChain: options.chain ?? [p.issuing.certDer, p.root.certDer],
    info: options.info ?? { batch: 'b-1', run: 's-test' },
  });
  for (const e of entries) await writer.add(e.name, e.data);
  return writer.finish();
}

async function readAll(file: string, options: { key?: KeyObject; roots?: Buffer[]; now?: Date } = {}): Promise<ArchiveEntry[]> {
  const out: ArchiveEntry[] = [];
  for await (const e of openArchive({ path: file, recipientPrivateKey: options.key ?? factory.privateKey, trustedRoots: options.roots ?? [pki.root.certDer], now: options.now })) out.push(e);
  return out;
}

/** Refused with `code`, and nothing was yielded before the refusal. */
async function refused(file: string, code: ErrorCode | ErrorCode[], message?: RegExp, options: Parameters<typeof readAll>[1] = {}): Promise<HallmarkError> {
  const got: ArchiveEntry[] = [];
  try {
    for await (const e of openArchive({ path: file, recipientPrivateKey: options.key ?? factory.privateKey, trustedRoots: options.roots ?? [pki.root.certDer], now: options.now })) got.push(e);
  } catch (err) {
    assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
    assert.ok((Array.isArray(code) ? code : [code]).includes(err.code), `expected ${String(code)}, got ${err.code}: ${err.message}`);
    if (message) assert.match(err.message, message);
    assert.equal(got.length, 0, 'nothing is yielded from an archive that fails verification');
    return err;
  }
  assert.fail(`${file} was accepted (${got.length} files)`);
}

const small = (n: number, size = 64): ArchiveEntry[] => Array.from({ length: n }, (_, i) => ({ name: `SN-${String(i).padStart(6, '0')}.json`, data: Buffer.alloc(size, i & 0xff) }));

describe('stamp archive round trip', () => {
  test('2,500 small files, an empty file and a 3 MiB file spanning chunks come back exactly, in order', async () => {
    const file = path();
    const entries = [...small(2500, 200), { name: 'empty.txt', data: Buffer.alloc(0) }, { name: 'stamps-s-test.csv', data: randomBytes(3 * 1024 * 1024 + 17) }, ...small(3, 10)];
    const result = await write(file, entries);
    assert.equal(result.files, entries.length);
    assert.equal(result.bytes, statSync(file).size);
    assert.equal(result.sha256, createHash('sha256').update(readFileSync(file)).digest('hex'));
    assert.equal(existsSync(`${file}.partial`), false);
    assert.equal(statSync(file).mode & 0o777, 0o600);
    const back = await readAll(file);
    assert.equal(back.length, entries.length);
    for (let i = 0; i < entries.length; i++) {
      assert.equal(back[i]!.name, entries[i]!.name);
      assert.ok(back[i]!.data.equals(entries[i]!.data), `file ${i} (${entries[i]!.name})`);
    }
    const archive = openArchive({ path: file, recipientPrivateKey: factory.privateKey, trustedRoots: [pki.root.certDer] });
    const summary = await archive.verify();
    assert.deepEqual(summary.info, { batch: 'b-1', run: 's-test' });
    assert.match(summary.signerSubject, /OEM Issuing CA 1/);
    assert.match(summary.rootSubject, /OEM Root CA/);
    assert.equal(summary.recipientKeySha256, factoryKeyFingerprint(factorySpki));
    assert.equal(summary.sha256, result.sha256);
    assert.ok(summary.chunks >= 4, `several chunks (${summary.chunks})`);
  });

  test('the plaintext is nowhere in the file, and the header names the factory key', async () => {
    const file = path();
    const marker = Buffer.from('-----BEGIN PRIVATE KEY----- secret marker 1234567890');
    await write(file, [{ name: 'x.json', data: marker }]);
    const bytes = readFileSync(file);
    assert.equal(bytes.indexOf(marker.subarray(0, 20)), -1);
    assert.notEqual(bytes.indexOf(createHash('sha256').update(factorySpki).digest()), -1);
  });

  for (const algorithm of ['ecdsa-p384', 'ed25519'] as const) {
    test(`a ${algorithm} issuing CA signs archives the factory verifies`, async () => {
      const other = makePki(algorithm, algorithm);
      const file = path();
      await write(file, small(3), { pki: other });
      assert.equal((await readAll(file, { roots: [other.root.certDer] })).length, 3);
      await refused(file, 'STAMP_ARCHIVE_UNTRUSTED', /does not chain to a trusted root/);
    });
  }

  test('memory stays flat in the number of files (2,000 vs 20,000), writing and reading', async () => {
    const size = 2048; // 20,000 files hold 40 MiB: kept in memory, that would show
    // Buffers are freed a little after a full GC (their backing stores go on another thread): settle first.
    const measure = async () => {
      for (let k = 0; k < 3; k++) { gc(); await new Promise((r) => setTimeout(r, 5)); }
      const m = process.memoryUsage();
      return m.heapUsed + m.arrayBuffers;
    };
    async function run(n: number): Promise<{ write: number; read: number }> {
      const file = path('mem');
      const before = await measure();
      const writer = await createArchiveWriter({ path: file, recipientPublicKeySpki: factorySpki, signer: signerOf(pki.issuing), signerCertificateChain: [pki.issuing.certDer, pki.root.certDer] });
      const data = randomBytes(size);
      for (let i = 0; i < n; i++) await writer.add(`SN-${i}.tlv.bin`, data);
      const writing = (await measure()) - before;
      await writer.finish();
      let i = 0;
      let reading = 0;
      const start = await measure();
      for await (const e of openArchive({ path: file, recipientPrivateKey: factory.privateKey, trustedRoots: [pki.root.certDer] })) {
        assert.equal(e.data.length, size);
        if (++i === n - 1) reading = (await measure()) - start;
      }
      assert.equal(i, n);
      return { write: writing, read: reading };
    }
    await run(200); // warm up (module state, JIT)
    const a = await run(2000);
    const b = await run(20000);
    const MiB = 1024 * 1024;
    assert.ok(b.write - a.write < 8 * MiB, `writing: ${(a.write / MiB).toFixed(1)} MiB for 2,000 files, ${(b.write / MiB).toFixed(1)} MiB for 20,000`);
    assert.ok(b.read - a.read < 8 * MiB, `reading: ${(a.read / MiB).toFixed(1)} MiB for 2,000 files, ${(b.read / MiB).toFixed(1)} MiB for 20,000`);
  });
});

describe('stamp archive refusals', () => {
  const one = path('one');
  const multi = path('multi');
  let oneBytes: Buffer;
  let multiBytes: Buffer;

  test('setup', async () => {
    await write(one, small(5));
    oneBytes = readFileSync(one);
    await write(multi, [...small(10), { name: 'big.bin', data: randomBytes(ARCHIVE_LIMITS.chunk * 2 + 100) }]);
    multiBytes = readFileSync(multi);
  });

  test('another factory\'s key: STAMP_ARCHIVE_WRONG_KEY naming the key it was made for', async () => {
    const other = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey;
    const err = await refused(one, 'STAMP_ARCHIVE_WRONG_KEY', /encrypted to factory key sha256:[0-9a-f]{64}, not to this key/, { key: other });
    assert.ok(err.message.includes(factoryKeyFingerprint(factorySpki)));
    assert.throws(() => openArchive({ path: one, recipientPrivateKey: generateKeyPairSync('ed25519').privateKey, trustedRoots: [pki.root.certDer] }), /P-256 private key/);
  });

  test('one flipped byte anywhere in a one-chunk archive is refused', async () => {
    const bad = path('flip');
    for (let at = 0; at < oneBytes.length; at++) {
      const copy = Buffer.from(oneBytes);
      copy[at]! ^= 0x04;
      writeFileSync(bad, copy);
      await refused(bad, ['STAMP_ARCHIVE_INVALID', 'STAMP_ARCHIVE_UNTRUSTED', 'STAMP_ARCHIVE_WRONG_KEY']);
    }
  });

  test('flipped bytes in a multi-chunk archive (chunk frames, ciphertexts, trailer) are refused', async () => {
    const bad = path('flip');
    const positions = [...Array.from({ length: 40 }, () => Math.floor(Math.random() * multiBytes.length)), multiBytes.length - 1, multiBytes.length - 80];
    for (const at of positions) {
      const copy = Buffer.from(multiBytes);
      copy[at]! ^= 0x01;
      writeFileSync(bad, copy);
      await refused(bad, ['STAMP_ARCHIVE_INVALID', 'STAMP_ARCHIVE_UNTRUSTED', 'STAMP_ARCHIVE_WRONG_KEY']);
    }
    const signatureFlip = Buffer.from(multiBytes);
    signatureFlip[multiBytes.length - 5]! ^= 0x01;
    writeFileSync(bad, signatureFlip);
    await refused(bad, 'STAMP_ARCHIVE_INVALID', /signature does not verify/);
  });

  test('every truncation of a one-chunk archive, and one cut at a chunk boundary, is refused', async () => {
    const bad = path('cut');
    for (let n = 0; n < oneBytes.length; n++) {
      writeFileSync(bad, oneBytes.subarray(0, n));
      await refused(bad, 'STAMP_ARCHIVE_INVALID', /truncated|not a Hallmark stamp archive|no signature trailer/);
    }
    // Cut right after the first (full, non-last) chunk of the multi-chunk archive.
    const headerLength = 14 + multiBytes.readUInt32BE(10);
    const firstChunkEnd = headerLength + 5 + multiBytes.readUInt32BE(headerLength + 1);
    writeFileSync(bad, multiBytes.subarray(0, firstChunkEnd));
    await refused(bad, 'STAMP_ARCHIVE_INVALID', /truncated: it ends after 1 chunks, without its last chunk/);
    writeFileSync(bad, Buffer.concat([multiBytes, Buffer.from([0])]));
    await refused(bad, 'STAMP_ARCHIVE_INVALID', /1 unexpected bytes after its signature/);
  });

  test('not an archive at all', async () => {
    const bad = path('junk');
    writeFileSync(bad, randomBytes(5000));
    await refused(bad, 'STAMP_ARCHIVE_INVALID', /is not a Hallmark stamp archive/);
  });

  test('a signer chain from an untrusted root is refused', async () => {
    const rogue = makePki('ecdsa-p256', 'Rogue');
    const file = path('rogue');
    await write(file, small(2), { pki: rogue });
    await refused(file, 'STAMP_ARCHIVE_UNTRUSTED', /does not chain to a trusted root \(the chain ends at CN=Rogue Root CA/);
    // A rogue CA with the same name as the trusted root does not pass either.
    const lookalike = makeCa('CN=OEM Root CA,O=OEM Org');
    const issuing = makeCa('CN=OEM Issuing CA 1,O=OEM Org', { issuer: lookalike });
    const file2 = path('lookalike');
    await write(file2, small(2), { pki: { root: lookalike, issuing } });
    await refused(file2, 'STAMP_ARCHIVE_UNTRUSTED');
  });

  test('an expired or not yet valid signer, and an end-entity signer, are refused', async () => {
    const file = path();
    await write(file, small(1));
    await refused(file, 'STAMP_ARCHIVE_UNTRUSTED', /is not valid at 2099/, { now: new Date('2099-01-01T00:00:00Z') });
    await refused(file, 'STAMP_ARCHIVE_UNTRUSTED', /is not valid at 2001/, { now: new Date('2001-01-01T00:00:00Z') });
    const device = makeCa('CN=some device,O=OEM Org', { issuer: pki.issuing, ca: false });
    const file2 = path('ee');
    await write(file2, small(1), { signer: signerOf(device), chain: [device.certDer, pki.issuing.certDer, pki.root.certDer] });
    await refused(file2, 'STAMP_ARCHIVE_UNTRUSTED', /is not a CA certificate/);
  });

  test('a file changed between verification and decryption is caught', async () => {
    const file = path('swap');
    await write(file, [...small(10), { name: 'big.bin', data: randomBytes(ARCHIVE_LIMITS.chunk + 10) }]);
    const archive = openArchive({ path: file, recipientPrivateKey: factory.privateKey, trustedRoots: [pki.root.certDer] });
    await archive.verify();
    const bytes = readFileSync(file);
    const headerLength = 14 + bytes.readUInt32BE(10);
    bytes[headerLength + 5 + 100]! ^= 0x01; // inside the first chunk's ciphertext
    writeFileSync(file, bytes);
    await assert.rejects(async () => { for await (const e of archive) void e; }, (err: unknown) => err instanceof HallmarkError && err.code === 'STAMP_ARCHIVE_INVALID' && /chunk 0 does not decrypt/.test(err.message));
  });
});

describe('stamp archive writer', () => {
  test('unsafe names are refused', async () => {
    const file = path();
    const writer = await createArchiveWriter({ path: file, recipientPublicKeySpki: factorySpki, signer: signerOf(pki.issuing), signerCertificateChain: [pki.issuing.certDer, pki.root.certDer] });
    for (const name of ['', '.', '..', '../etc/passwd', 'a/b', 'a\\b', 'a\0b', 'x..y', 'a\nb', 'é'.repeat(200)]) {
      await assert.rejects(writer.add(name, Buffer.from('x')), (err: unknown) => err instanceof HallmarkError && err.code === 'BAD_REQUEST', JSON.stringify(name));
    }
    // A refused name leaves the writer usable.
    await writer.add('SN 0001 (rev. B).json', Buffer.from('ok'));
    assert.equal(existsSync(file), false, 'nothing at the final path before finish()');
    assert.equal(existsSync(`${file}.partial`), true);
    await writer.abort();
    assert.equal(existsSync(`${file}.partial`), false);
    await assert.rejects(writer.add('x', Buffer.from('x')), /aborted/);
  });

  test('a second writer on the same path, a foreign signer chain and a non-P-256 factory key are refused', async () => {
    const file = path();
    const w = await createArchiveWriter({ path: file, recipientPublicKeySpki: factorySpki, signer: signerOf(pki.issuing), signerCertificateChain: [pki.issuing.certDer] });
    await assert.rejects(createArchiveWriter({ path: file, recipientPublicKeySpki: factorySpki, signer: signerOf(pki.issuing), signerCertificateChain: [pki.issuing.certDer] }), /\.partial exists/);
    await w.abort();
    await assert.rejects(createArchiveWriter({ path: path(), recipientPublicKeySpki: factorySpki, signer: signerOf(pki.issuing), signerCertificateChain: [pki.root.certDer] }), /not the certificate of the signing key/);
    await assert.rejects(createArchiveWriter({ path: path(), recipientPublicKeySpki: spkiOf(generateKeyPairSync('x25519').privateKey), signer: signerOf(pki.issuing), signerCertificateChain: [pki.issuing.certDer] }), /must be an EC P-256 key/);
    await assert.rejects(createArchiveWriter({ path: path(), recipientPublicKeySpki: factorySpki, signer: signerOf(pki.issuing), signerCertificateChain: [] }), /1-8 certificates/);
  });

  test('a signer whose signature does not match its certificate leaves no archive', async () => {
    const file = path();
    const wrong = makeCa('CN=Other', {});
    const signer = { ...signerOf(wrong), publicKeySpki: pki.issuing.spki };
    const w = await createArchiveWriter({ path: file, recipientPublicKeySpki: factorySpki, signer, signerCertificateChain: [pki.issuing.certDer, pki.root.certDer] });
    await w.add('a.json', Buffer.from('{}'));
    await assert.rejects(w.finish(), /does not verify with the signer certificate/);
    await w.abort();
    assert.equal(existsSync(file), false);
    assert.equal(existsSync(`${file}.partial`), false);
  });
});
