// The factory's stamp commands through `hallmark`: stamp inspect (every format, secrets hidden, a bad
// file named), stamp factory-key (an encrypted key, never a clear one) and stamp open (verified before
// anything is written; a bad archive, another factory's key or an untrusted root writes nothing).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createPrivateKey, createPublicKey, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createArchiveWriter } from '../../src/factory/archive.js';
import { STAMP_FORMATS } from '../../src/factory/formats/index.js';
import { TLV_TYPES } from '../../src/factory/formats/tlv.js';
import { jsonFormat } from '../../src/factory/formats/json.js';
import { encodePem } from '../../src/pki/pem.js';
import { makeTempDir } from '../helpers/tmp.js';
import { makePki, makeStamp, signerOf, type Pki } from './stamp-fixtures.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const PASSPHRASE = 'factory test passphrase, long enough';
const ENV = { ...process.env, HALLMARK_FACTORY_PASSPHRASE: PASSPHRASE, HALLMARK_PASSPHRASE: '', HALLMARK_DATABASE_URL: '' };

interface Result { code: number; stdout: string; stderr: string }

function hallmark(args: string[], env: Record<string, string | undefined> = {}): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...ENV, ...env }, timeout: 60000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function ok(args: string[], env: Record<string, string | undefined> = {}): Result {
  const r = hallmark(args, env);
  assert.equal(r.code, 0, `hallmark ${args.join(' ')} failed: ${r.stderr}${r.stdout}`);
  return r;
}

/** Exit 1 with one line on stderr naming the code. */
function refused(args: string[], code: string, message?: RegExp, env: Record<string, string | undefined> = {}): Result {
  const r = hallmark(args, env);
  assert.equal(r.code, 1, `hallmark ${args.join(' ')} should exit 1: ${r.stdout}${r.stderr}`);
  assert.match(r.stderr, new RegExp(`\\[${code}\\]`), r.stderr);
  if (message) assert.match(r.stderr, message);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
  return r;
}

const tmp = await makeTempDir('hallmark-stamp-cli-');
after(() => tmp.cleanup());
const dir = tmp.path;
const pki = makePki('ecdsa-p256', 'OEM');
const stamp = makeStamp(pki, { serial: 'SN-CLI-1' });
const rootPem = join(dir, 'root.pem');
writeFileSync(rootPem, encodePem('CERTIFICATE', pki.root.certDer));

describe('hallmark stamp inspect', () => {
  const files: Record<string, string> = {};
  before(() => {
    for (const f of STAMP_FORMATS) {
      files[f.name] = join(dir, `SN-CLI-1${f.extension}`);
      writeFileSync(files[f.name]!, f.encode(stamp));
    }
  });

  test('every format: a summary, exit 0, and no secret printed', () => {
    for (const f of STAMP_FORMATS) {
      const r = ok(['stamp', 'inspect', files[f.name]!]);
      assert.match(r.stdout, new RegExp(`a good ${f.name} stamp`));
      assert.match(r.stdout, /serial number\s+SN-CLI-1/);
      assert.ok(r.stdout.includes(stamp.udid));
      assert.match(r.stdout, /OEM Issuing CA 1/);
      assert.match(r.stdout, /OEM Root CA.*\(self-signed root\)/);
      assert.match(r.stdout, /device key\s+present \(EC P-256\), matches the certificate/);
      for (const secret of [stamp.popSecret.toString('hex'), stamp.popSecret.toString('base64'), stamp.qrPayload, 'PRIVATE KEY', stamp.devicePrivateKeyPkcs8!.toString('base64').slice(0, 40)]) {
        assert.ok(!r.stdout.includes(secret) && !r.stderr.includes(secret), `${f.name}: must not print ${secret.slice(0, 20)}…`);
      }
    }
  });

  test('--json, and --show-secrets', () => {
    const report = JSON.parse(ok(['stamp', 'inspect', files.tlv!, '--json']).stdout);
    assert.equal(report.format, 'tlv');
    assert.equal(report.serialNumber, 'SN-CLI-1');
    assert.equal(report.devicePrivateKey.present, true);
    assert.equal(report.certificate.validity, 'valid');
    assert.equal(report.secrets, undefined);
    assert.equal(JSON.stringify(report).includes(stamp.popSecret.toString('hex')), false);
    const shown = ok(['stamp', 'inspect', files.nvs!, '--show-secrets']).stdout;
    assert.ok(shown.includes(stamp.popSecret.toString('hex')));
    assert.ok(shown.includes(stamp.qrPayload));
    assert.match(shown, /-----BEGIN PRIVATE KEY-----/);
  });

  test('a flipped byte in the TLV certificate record: exit 1 naming the record', () => {
    const image = Buffer.from(readFileSync(files.tlv!));
    // Walk to the certificate record (type 0x0010).
    let at = 32;
    while (image.readUInt16LE(at) !== TLV_TYPES.certificate) at += 10 + image.readUInt32LE(at + 2);
    image[at + 6 + 40]! ^= 0x10;
    const bad = join(dir, 'bad.tlv.bin');
    writeFileSync(bad, image);
    refused(['stamp', 'inspect', bad], 'STAMP_INVALID', /record 6 \(certificate, type 0x0010, at offset \d+\) fails its CRC32/);
  });

  test('wrong --format, an unknown format, a non-stamp file, a broken chain, a missing file', () => {
    refused(['stamp', 'inspect', files.json!, '--format', 'tlv'], 'STAMP_INVALID', /bad magic/);
    refused(['stamp', 'inspect', files.json!, '--format', 'xml'], 'BAD_REQUEST', /unknown stamp format/);
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, randomBytes(100));
    refused(['stamp', 'inspect', junk], 'STAMP_INVALID', /not a stamp file/);
    const other = makePki('ecdsa-p256', 'Other');
    const wrongChain = join(dir, 'wrong-chain.json');
    writeFileSync(wrongChain, jsonFormat.encode({ ...stamp, chainDer: [other.issuing.certDer, other.root.certDer] }));
    refused(['stamp', 'inspect', wrongChain], 'STAMP_INVALID', /the certificate .* is not issued by chain certificate 1/);
    refused(['stamp', 'inspect', join(dir, 'nope.json')], 'BAD_REQUEST', /cannot read stamp file/);
  });
});

describe('hallmark stamp factory-key and stamp open', () => {
  const keyDir = join(dir, 'factory');
  const otherKeyDir = join(dir, 'other-factory');
  const stamps = [stamp, makeStamp(pki, { serial: 'SN-CLI-2' }), makeStamp(pki, { serial: 'SN-CLI-3', withDeviceKey: false })];
  const original = new Map<string, Buffer>();
  let archive: string;

  async function makeArchive(path: string, entries: [string, Buffer][], p: Pki = pki, keyFile = join(keyDir, 'factory.pem')): Promise<string> {
    const spki = createPublicKey(readFileSync(keyFile, 'utf8')).export({ type: 'spki', format: 'der' });
    const writer = await createArchiveWriter({ path, recipientPublicKeySpki: spki, signer: signerOf(p.issuing), signerCertificateChain: [p.issuing.certDer, p.root.certDer], info: { batch: 'b-cli', run: 's-cli' } });
    for (const [name, data] of entries) await writer.add(name, data);
    await writer.finish();
    return path;
  }

  /** The directory holds nothing but what was there before (no output dir, no temporary dir). */
  function nothingWritten(out: string, before: string[]): void {
    assert.equal(existsSync(out), false, `${out} must not exist`);
    assert.deepEqual(readdirSync(dir).sort(), before, 'no temporary directory is left behind');
  }

  test('factory-key writes a public key and an encrypted private key, and never overwrites', () => {
    const r = ok(['stamp', 'factory-key', '--out', keyDir]);
    assert.match(r.stdout, /Factory key made: sha256:[0-9a-f]{64}/);
    const keyText = readFileSync(join(keyDir, 'factory.key'), 'utf8');
    assert.match(keyText, /^-----BEGIN ENCRYPTED PRIVATE KEY-----\n/);
    assert.equal(keyText.includes('BEGIN PRIVATE KEY'), false);
    assert.equal(statSync(join(keyDir, 'factory.key')).mode & 0o777, 0o600);
    const pub = createPublicKey(readFileSync(join(keyDir, 'factory.pem'), 'utf8'));
    assert.equal(pub.asymmetricKeyDetails?.namedCurve, 'prime256v1');
    const priv = createPrivateKey({ key: keyText, format: 'pem', passphrase: PASSPHRASE });
    assert.ok(createPublicKey(priv).export({ type: 'spki', format: 'der' }).equals(pub.export({ type: 'spki', format: 'der' })));
    assert.throws(() => createPrivateKey({ key: keyText, format: 'pem', passphrase: 'wrong passphrase!' }));
    // OpenSSL reads it too (PBES2 with scrypt), when it is installed.
    const openssl = spawnSync('openssl', ['pkey', '-in', join(keyDir, 'factory.key'), '-passin', `pass:${PASSPHRASE}`, '-pubout'], { encoding: 'utf8' });
    if (!openssl.error) assert.equal(openssl.status, 0, openssl.stderr);
    refused(['stamp', 'factory-key', '--out', keyDir], 'BAD_REQUEST', /exists: a factory key is never overwritten/);
    refused(['stamp', 'factory-key', '--out', join(dir, 'short')], 'BAD_REQUEST', /at least 12 characters/, { HALLMARK_FACTORY_PASSPHRASE: 'short' });
    assert.equal(existsSync(join(dir, 'short', 'factory.key')), false);
    ok(['stamp', 'factory-key', '--out', otherKeyDir]);
  });

  test('stamp open verifies, decrypts and writes every file (0600) into a new directory', async () => {
    const entries: [string, Buffer][] = [];
    for (const s of stamps) for (const f of STAMP_FORMATS) entries.push([`${s.serialNumber}${f.extension}`, f.encode(s)]);
    entries.push(['stamps-s-cli.csv', Buffer.from('serial_number,udid,certificate_sha256\r\n')]);
    for (const [name, data] of entries) original.set(name, data);
    archive = await makeArchive(join(dir, 'stamps.hsa'), entries);
    const out = join(dir, 'opened');
    const r = ok(['stamp', 'open', archive, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', out]);
    assert.match(r.stdout, /10 files \(3 json, 3 tlv, 3 nvs, 1 other\)/);
    assert.match(r.stdout, /signed by\s+CN=OEM Issuing CA 1/);
    assert.match(r.stdout, /chains to\s+CN=OEM Root CA/);
    assert.match(r.stdout, /batch=b-cli/);
    assert.deepEqual(readdirSync(out).sort(), [...original.keys()].sort());
    for (const [name, data] of original) {
      assert.ok(readFileSync(join(out, name)).equals(data), name);
      assert.equal(statSync(join(out, name)).mode & 0o777, 0o600, name);
    }
    assert.equal(statSync(out).mode & 0o777, 0o700);
    // The opened stamps inspect clean.
    ok(['stamp', 'inspect', join(out, 'SN-CLI-3.tlv.bin')]);
    // An existing empty directory is fine too.
    const empty = join(dir, 'empty-out');
    mkdirSync(empty);
    ok(['stamp', 'open', archive, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', empty]);
    assert.equal(readdirSync(empty).length, 10);
  });

  test('a bad archive writes nothing: a flipped byte, a truncation, a duplicate name', async () => {
    const bytes = readFileSync(archive);
    const out = join(dir, 'never');
    const flipped = join(dir, 'flipped.hsa');
    const copy = Buffer.from(bytes);
    copy[Math.floor(copy.length / 2)]! ^= 0x01;
    writeFileSync(flipped, copy);
    const truncated = join(dir, 'truncated.hsa');
    writeFileSync(truncated, bytes.subarray(0, bytes.length - 100));
    const duplicate = await makeArchive(join(dir, 'duplicate.hsa'), [['a.json', Buffer.from('1')], ['b.json', Buffer.from('2')], ['a.json', Buffer.from('3')]]);
    const before = readdirSync(dir).sort();
    refused(['stamp', 'open', flipped, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', out], 'STAMP_ARCHIVE_INVALID', /signature does not verify/);
    nothingWritten(out, before);
    refused(['stamp', 'open', truncated, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', out], 'STAMP_ARCHIVE_INVALID', /no signature trailer|truncated/);
    nothingWritten(out, before);
    refused(['stamp', 'open', duplicate, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', out], 'STAMP_ARCHIVE_INVALID', /the same file name twice/);
    nothingWritten(out, before);
  });

  test('another factory\'s key, an untrusted root, a wrong passphrase: refused, nothing written', async () => {
    const out = join(dir, 'never2');
    const otherRoot = join(dir, 'other-root.pem');
    writeFileSync(otherRoot, encodePem('CERTIFICATE', makePki('ecdsa-p256', 'Elsewhere').root.certDer));
    const before = readdirSync(dir).sort();
    refused(['stamp', 'open', archive, '--key', join(otherKeyDir, 'factory.key'), '--trust', rootPem, '--out', out], 'STAMP_ARCHIVE_WRONG_KEY', /encrypted to factory key sha256:[0-9a-f]{64}, not to this key/);
    nothingWritten(out, before);
    refused(['stamp', 'open', archive, '--key', join(keyDir, 'factory.key'), '--trust', otherRoot, '--out', out], 'STAMP_ARCHIVE_UNTRUSTED', /does not chain to a trusted root/);
    nothingWritten(out, before);
    refused(['stamp', 'open', archive, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', out], 'BAD_PASSPHRASE', /does not open/, { HALLMARK_FACTORY_PASSPHRASE: 'not the passphrase at all' });
    nothingWritten(out, before);
    // A clear private key is not accepted as a factory key.
    const clear = join(dir, 'clear.key');
    writeFileSync(clear, encodePem('PRIVATE KEY', Buffer.from(stamp.devicePrivateKeyPkcs8!)));
    refused(['stamp', 'open', archive, '--key', clear, '--trust', rootPem, '--out', out], 'BAD_PEM', /unencrypted keys are refused/);
    nothingWritten(out, [...before, 'clear.key'].sort());
    // A non-empty output directory is refused before anything is read.
    refused(['stamp', 'open', archive, '--key', join(keyDir, 'factory.key'), '--trust', rootPem, '--out', keyDir], 'BAD_REQUEST', /is not empty/);
  });
});
