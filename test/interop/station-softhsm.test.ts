// The offline factory station end to end through the `hallmark` command, with the station key in a
// SoftHSM2 token: init, signing CSRs made by openssl and by node, openssl verifying every certificate
// against the root (and refusing one outside the name constraints), the quota, a wrong PIN, refused key
// types, the journal checked and tampered with, and kill -9 in the middle of a run.

import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createECDH, createPrivateKey } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { signCertificate, signingCa } from '../../src/authority/certificate-signer.js';
import { PROFILES } from '../../src/authority/profiles.js';
import { Pkcs11KeyBackend } from '../../src/keys/pkcs11-backend.js';
import { parseCertificate } from '../../src/pki/certificate.js';
import { createCsr } from '../../src/pki/csr.js';
import { keyIdentifier } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { verifyJournal, type JournalVerification } from '../../src/station/journal.js';
import { softHsmAvailable } from '../helpers/softhsm.js';
import { makeTempDirSync } from '../helpers/tmp.js';
import { createStationToken, deviceCsr, makePackage, makeRoot, type StationToken, type TestCa } from '../station/fixtures.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const available = softHsmAvailable();
const skip = !available && process.env.CI !== 'true' ? 'softhsm2 not installed: apt-get install softhsm2' : false;

function opensslCsr(dir: string, name: string, newkey: string[]): string {
  const out = join(dir, `${name}.csr`);
  execFileSync('openssl', ['req', '-new', ...newkey, '-nodes', '-keyout', join(dir, `${name}.key`), '-subj', `/CN=${name}/O=Not From The CSR`, '-out', out], { stdio: 'ignore' });
  return out;
}

/** Fast P-256 CSRs (createECDH), DER. */
function fastCsrs(n: number): Buffer[] {
  const ecdh = createECDH('prime256v1');
  return Array.from({ length: n }, () => {
    ecdh.generateKeys();
    const p = ecdh.getPublicKey();
    const privateKey = createPrivateKey({ key: { kty: 'EC', crv: 'P-256', x: p.subarray(1, 33).toString('base64url'), y: p.subarray(33, 65).toString('base64url'), d: Buffer.from(ecdh.getPrivateKey().toString('hex').padStart(64, '0'), 'hex').toString('base64url') }, format: 'jwk' });
    return createCsr({ subject: encodeNameString('CN=jig'), privateKey });
  });
}

const kindsOf = (v: JournalVerification): string[] => v.problems.map((p) => `${p.kind}@${p.seq}`);

describe('factory station with SoftHSM2 through the CLI', { skip }, () => {
  let tok: StationToken;
  let root: TestCa;
  let dir: string;
  let rootPem: string;
  let env: Record<string, string>;

  const run = (args: string[], extra: Record<string, string> = {}, input?: string | Buffer) =>
    spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env, ...extra }, input, timeout: 120_000, maxBuffer: 64 * 1024 * 1024 });
  const ok = (args: string[], extra: Record<string, string> = {}, input?: string | Buffer) => {
    const r = run(args, extra, input);
    assert.equal(r.status, 0, `hallmark ${args.join(' ')}: ${r.stderr}`);
    return r;
  };
  const opensslVerify = (cert: string, untrusted: string) => spawnSync('openssl', ['verify', '-CAfile', rootPem, '-untrusted', untrusted, cert], { encoding: 'utf8' });

  async function newStation(name: string, manifest: Record<string, unknown>): Promise<{ pkg: string; station: string }> {
    const pkg = join(dir, `${name}-package`);
    await makePackage(pkg, { stationSpki: tok.spki, root, manifest: { stationId: name, keyUri: tok.keyUri, ...manifest } });
    const station = join(dir, name);
    ok(['station', 'init', pkg, '--dir', station, '--module', tok.token.module], { HALLMARK_PKCS11_PIN: tok.token.pin });
    return { pkg, station };
  }

  before(async () => {
    assert.ok(available, 'softhsm2 is required under CI=true (apt-get install softhsm2)');
    tok = await createStationToken('factory-a');
    root = makeRoot();
    dir = makeTempDirSync('hallmark-station-cli-');
    rootPem = join(dir, 'root.pem');
    writeFileSync(rootPem, encodePem('CERTIFICATE', root.der));
    env = { ...tok.token.env, HALLMARK_PKCS11_PIN: '', HALLMARK_PASSPHRASE: '', HALLMARK_PKCS11_MODULE: '' };
  });
  after(async () => {
    await tok?.token.cleanup();
  });

  test('init with a wrong PIN is one clear error and writes nothing; init, sign, verify with openssl, quota, status, export', async () => {
    const pkg = join(dir, 'a-package');
    await makePackage(pkg, { stationSpki: tok.spki, root, manifest: { keyUri: tok.keyUri, quota: 8 } });
    const station = join(dir, 'a');
    const bad = run(['station', 'init', pkg, '--dir', station, '--module', tok.token.module], { HALLMARK_PKCS11_PIN: '11112222' });
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /^hallmark station init: wrong PIN for PKCS#11 token "factory-a" \[BAD_PASSPHRASE\]\n$/);
    assert.ok(!existsSync(station));
    const pinFile = join(dir, 'pin');
    writeFileSync(pinFile, tok.token.pin + '\n');
    const init = ok(['station', 'init', pkg, '--dir', station, '--key', tok.keyUri, '--module', tok.token.module, '--pin-file', pinFile]);
    assert.match(init.stdout, /quota: +8 devices: 0 signed, 8 left/);

    // CSRs made by openssl and by node; an RSA and a P-192 one among them.
    const csrs = join(dir, 'a-csrs');
    mkdirSync(csrs);
    opensslCsr(csrs, 'o1', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256']);
    opensslCsr(csrs, 'o2', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256']);
    opensslCsr(csrs, 'o3', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-384']);
    opensslCsr(csrs, 'o4', ['-newkey', 'ed25519']);
    opensslCsr(csrs, 'r1', ['-newkey', 'rsa:2048']);
    opensslCsr(csrs, 'w1', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime192v1']);
    for (const f of readdirSync(csrs).filter((f) => f.endsWith('.key'))) execFileSync('rm', [join(csrs, f)]);
    writeFileSync(join(csrs, 'n1.pem'), deviceCsr().pem);
    writeFileSync(join(csrs, 'n2-and-n3.pem'), deviceCsr().pem + deviceCsr('P-384').pem);
    const certs = join(dir, 'a-certs');
    const first = run(['station', 'sign', '--dir', station, '--csr-dir', csrs, '--out', certs], { HALLMARK_PKCS11_PIN: tok.token.pin });
    assert.equal(first.status, 1, 'exit 1: some CSRs were refused');
    assert.match(first.stderr, /refused .*r1\.csr: the CSR carries an RSA 2048-bit key; the station signs only P-256, P-384 and Ed25519 device keys \[UNSUPPORTED_ALGORITHM\]/);
    assert.match(first.stderr, /refused .*w1\.csr: the CSR carries an EC key on P-192.*\[UNSUPPORTED_ALGORITHM\]/);
    assert.match(first.stderr, /7 signed, 2 refused; quota 7\/8 used, 1 left/);
    const lines = first.stdout.trim().split('\n');
    assert.equal(lines.length, 7);
    for (const l of lines) assert.match(l, /^signed [0-9a-f]{64} seq \d \(.+\) -> .+\.pem$/);
    const files = readdirSync(certs).filter((f) => f.endsWith('.pem'));
    assert.equal(files.length, 7);
    for (const f of files) {
      const v = opensslVerify(join(certs, f), join(certs, f)); // the file carries the chain after the device certificate
      assert.equal(v.status, 0, `${f}: ${v.stdout}${v.stderr}`);
      const text = execFileSync('openssl', ['x509', '-in', join(certs, f), '-noout', '-subject', '-ext', 'subjectAltName'], { encoding: 'utf8' });
      assert.match(text, new RegExp(`subject=O = Acme Devices, OU = thermostat, OU = batch b-0001, CN = ${f.slice(0, -4)}`));
      assert.match(text, new RegExp(`URI:urn:hallmark:udid:${f.slice(0, -4)}`));
      assert.doesNotMatch(text, /Not From The CSR/);
    }
    const stationPem = join(station, 'station.pem');
    assert.equal(opensslVerify(join(certs, files[0]!), stationPem).status, 0);

    // Quota: the 8th signs, the 9th is refused and writes no file.
    const more = join(dir, 'a-more');
    mkdirSync(more);
    writeFileSync(join(more, 'x1.pem'), deviceCsr().pem);
    writeFileSync(join(more, 'x2.pem'), deviceCsr().pem);
    const second = run(['station', 'sign', '--dir', station, '--csr', join(more, 'x1.pem'), '--csr', join(more, 'x2.pem'), '--out', certs], { HALLMARK_PKCS11_PIN: tok.token.pin });
    assert.equal(second.status, 1);
    assert.match(second.stderr, /refused .*x2\.pem: the quota of 8 devices for batch b-0001 is used up.*\[STATION_QUOTA_EXHAUSTED\]/);
    assert.equal(readdirSync(certs).filter((f) => f.endsWith('.pem')).length, 8);

    // A certificate the station key signs outside the subtree: openssl refuses it (name constraints work).
    const backend = await Pkcs11KeyBackend.open({ module: tok.token.module, token: tok.token.token, pin: tok.token.pin });
    try {
      const stationCert = parseCertificate(Buffer.from(readFileSync(stationPem, 'utf8').replace(/-----[A-Z ]+-----|\s/g, ''), 'base64'));
      const signer = await backend.signer({ backend: 'pkcs11', id: tok.keyUri, algorithm: 'ecdsa-p256' });
      const forced = await signCertificate(signingCa(stationCert.subject, keyIdentifier(stationCert.subjectPublicKeyInfo), signer, stationCert.notAfter), {
        profile: PROFILES.device, subject: encodeNameString('O=Someone Else,OU=kettle,CN=rogue'), subjectPublicKeyInfo: deviceCsr().spki, subjectKeyKind: 'ecdsa-p256', validityDays: 30,
      });
      writeFileSync(join(dir, 'rogue.pem'), encodePem('CERTIFICATE', forced.der));
      const v = opensslVerify(join(dir, 'rogue.pem'), stationPem);
      assert.notEqual(v.status, 0);
      assert.match(v.stdout + v.stderr, /permitted subtree violation/);
    } finally {
      await backend.close();
    }

    const status = JSON.parse(ok(['station', 'status', '--dir', station, '--json']).stdout);
    assert.equal(status.issued, 8);
    assert.equal(status.left, 0);
    assert.equal(status.unsigned, 0);
    assert.equal(status.manifestBound, true);
    assert.match(ok(['station', 'status', '--dir', station]).stdout, /package: +station\.json signed off by the root/);

    const journal = join(dir, 'a-journal.jsonl');
    const exp = ok(['station', 'export', '--dir', station, '--out', journal]);
    assert.match(exp.stdout, /issuances: +8/);
    const v = await verifyJournal(journal, { stationCertificate: readFileSync(stationPem), trustedRoots: [root.der], manifest: JSON.parse(readFileSync(join(station, 'station.json'), 'utf8')) });
    assert.deepEqual(v.problems, []);
    assert.equal(v.entries.length, 8);
    const issued = new Set(v.entries.map((e) => e.udid));
    for (const f of readdirSync(certs).filter((f) => f.endsWith('.pem'))) assert.ok(issued.has(f.slice(0, -4)));

    // The journal tampered with: each fault is reported naming its seq.
    const text = readFileSync(journal, 'utf8').trim().split('\n');
    const check = async (lines: string[]) => verifyJournal(lines.join('\n') + '\n', { stationCertificate: readFileSync(stationPem) });
    const edited = [...text];
    edited[3] = edited[3]!.replace(/"at":"[^"]+"/, '"at":"2001-01-01T00:00:00.000Z"'); // seq 3
    assert.ok((await check(edited)).problems.some((p) => p.kind === 'edited' && p.seq === 3));
    const removed = text.filter((_, i) => i !== 5); // seq 5
    assert.ok((await check(removed)).problems.some((p) => p.kind === 'gap' && p.seq === 5));
    const duplicated = [...text.slice(0, 3), text[2]!, ...text.slice(3)]; // seq 2 twice
    assert.deepEqual(kindsOf(await check(duplicated)), ['duplicate@2']);
    const forged = [...text];
    const last = forged.length - 1;
    const cp = JSON.parse(forged[last]!) as { signature: string; seq: number };
    const sig = Buffer.from(cp.signature, 'base64');
    sig[sig.length - 3] ^= 0x40;
    forged[last] = forged[last]!.replace(cp.signature, sig.toString('base64'));
    const f = await check(forged);
    assert.ok(f.problems.some((p) => p.kind === 'forged' && p.seq === cp.seq), kindsOf(f).join(' '));
    // Without its last checkpoint, seq 8 (signed in the second run) is covered by no station signature.
    assert.deepEqual(kindsOf(await check(text.slice(0, last))), ['unsigned@8']);
  });

  test('standard input: a flashing jig pipes PEM CSRs and reads the certificates back', async () => {
    const { station } = await newStation('jig', { quota: 100 });
    const input = deviceCsr().pem + deviceCsr('ed25519').pem;
    const r = ok(['station', 'sign', '--dir', station, '-'], { HALLMARK_PKCS11_PIN: tok.token.pin }, input);
    assert.equal((r.stdout.match(/BEGIN CERTIFICATE/g) ?? []).length, 2 * 2, 'each device certificate followed by station.pem');
    assert.match(r.stderr, /signed [0-9a-f]{64} seq 1 \(stdin#1\)/);
    assert.match(r.stderr, /signed [0-9a-f]{64} seq 2 \(stdin#2\)/);
    const noPin = run(['station', 'sign', '--dir', station, '-'], {}, input);
    assert.equal(noPin.status, 1);
    assert.match(noPin.stderr, /PIN is needed.*\[PASSPHRASE_REQUIRED\]/);
  });

  test('kill -9 during a run: every complete journal line verifies, no certificate out without its line; a rerun resumes', async () => {
    const { station } = await newStation('crash', { quota: 10_000 });
    const csrs = join(dir, 'crash-csrs');
    mkdirSync(csrs);
    const ders = fastCsrs(2500);
    ders.forEach((d, i) => writeFileSync(join(csrs, `${String(i).padStart(5, '0')}.csr`), encodePem('CERTIFICATE REQUEST', d)));
    const certs = join(dir, 'crash-certs');
    const child = spawn(process.execPath, [BIN, 'station', 'sign', '--dir', station, '--csr-dir', csrs, '--out', certs], { env: { ...process.env, ...env, HALLMARK_PKCS11_PIN: tok.token.pin }, stdio: 'ignore' });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      // Count certificates only: a file being written is a temporary one until renamed.
      if (existsSync(certs) && readdirSync(certs).filter((f) => f.endsWith('.pem')).length >= 500) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    child.kill('SIGKILL');
    await exited;
    const written = readdirSync(certs).filter((f) => f.endsWith('.pem'));
    assert.ok(written.length >= 500 && written.length < 2500, `killed mid-run (${written.length} certificates out)`);

    const journalPath = join(station, 'journal.jsonl');
    const v = await verifyJournal(journalPath, { stationCertificate: readFileSync(join(station, 'station.pem')) });
    const bad = v.problems.filter((p) => p.kind !== 'unsigned' && p.kind !== 'torn');
    assert.deepEqual(bad, [], 'every complete line verifies');
    assert.ok(v.problems.filter((p) => p.kind === 'torn').length <= 1);
    // Every certificate handed out has its journal line.
    const journalled = new Set(readFileSync(journalPath, 'utf8').split('\n').filter((l) => l.startsWith('{"type":"issue"')).map((l) => JSON.parse(l).certificate as string));
    for (const f of written) {
      const der = Buffer.from(readFileSync(join(certs, f), 'utf8').split('-----END CERTIFICATE-----')[0]!.replace(/-----BEGIN CERTIFICATE-----|\s/g, ''), 'base64');
      assert.ok(journalled.has(der.toString('base64')), `${f} was written without its journal line`);
    }

    // The rerun takes over the stale lock, cuts a torn line, resends what was signed, signs the rest.
    const rerun = run(['station', 'sign', '--dir', station, '--csr-dir', csrs, '--out', certs, '--resend'], { HALLMARK_PKCS11_PIN: tok.token.pin });
    assert.equal(rerun.status, 0, rerun.stderr.slice(-2000));
    assert.match(rerun.stderr, /2500 signed, 0 refused; quota 2500\/10000 used/);
    assert.equal(readdirSync(certs).filter((f) => f.endsWith('.pem')).length, 2500);
    const journal = join(dir, 'crash-journal.jsonl');
    ok(['station', 'export', '--dir', station, '--out', journal]);
    const after = await verifyJournal(journal, { stationCertificate: readFileSync(join(station, 'station.pem')), trustedRoots: [root.der] });
    assert.deepEqual(after.problems, []);
    assert.equal(after.entries.length, 2500);
  });
});
