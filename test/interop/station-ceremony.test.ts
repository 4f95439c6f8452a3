// An offline factory station end to end through the `hallmark` command, with SoftHSM2 as the station's
// token and openssl making the devices' keys and CSRs and checking the certificates:
//
//   HQ        station create  -> the printed `hallmark root sign …` run at the ceremony -> station install
//   factory   station init -> station sign (openssl CSRs) -> station export
//   HQ        station import (twice: nothing the second time), station list, revoke --device
//
// and the refusals: a wrong PIN (nothing stored), a package for another line, an edited journal, a
// journal for another station or an unknown one, entries beyond the quota (a package whose quota the
// factory raised), a certificate for another station's key.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createSoftHsmToken, softHsmAvailable, type SoftHsmToken } from '../helpers/softhsm.js';

const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const PASSPHRASE = 'station ceremony passphrase';
const DAY = 86_400_000;

const available = softHsmAvailable();
const skip = !available && process.env.CI !== 'true' ? 'softhsm2 not installed: apt-get install softhsm2' : false;

interface Result { code: number; stdout: string; stderr: string }

interface ImportReport {
  station: string;
  imported: { seq: number; udid: string; serial: string; newDevice: boolean }[];
  alreadyImported: number[];
  refused: { seq: number; kind: string; message: string }[];
  quota: { quota: number; issued: number; remaining: number };
}

describe('offline factory station: the whole ceremony through the CLI (SoftHSM2, openssl)', { skip, timeout: 300_000 }, () => {
  let dir: string;
  let token: SoftHsmToken;
  let env: Record<string, string>;
  let home: string;
  let rootDir: string;
  let pinFile: string;
  let binDir: string;

  const run = (args: string[], input?: string): Result => {
    const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000, ...(input !== undefined ? { input } : {}) });
    return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  };
  const ok = (args: string[]): Result => {
    const r = run(args);
    assert.equal(r.code, 0, `hallmark ${args.join(' ')}\n${r.stderr}\n${r.stdout}`);
    return r;
  };
  const fails = (args: string[], code: string): Result => {
    const r = run(args);
    assert.notEqual(r.code, 0, `hallmark ${args.join(' ')} should fail\n${r.stdout}`);
    assert.match(r.stderr, new RegExp(`\\[${code}\\]`), r.stderr);
    return r;
  };
  const openssl = (args: string[]): string => execFileSync('openssl', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const station = (sub: string, args: string[]) => [...['station', sub], ...args, '--pin-file', pinFile, '--module', token.module];

  /** Devices: keys and CSRs made by openssl (what a device makes itself). */
  const csrs = (name: string, count: number): string => {
    const out = join(dir, name);
    mkdirSync(out);
    for (let i = 0; i < count; i++) {
      openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, `${name}-${i}.key`), '-subj', `/CN=asks-for-anything-${i}/O=Evil`, '-out', join(out, `${i}.csr`)]);
    }
    return out;
  };

  /** station create + the printed root sign command (run as printed, through a shell) + station install. */
  const prepare = (line: string, quota: number, pkg: string, install = true): { id: string; batch: string; base: string } => {
    const created = ok(['station', 'create', '--home', home, '--line', line, '--quota', String(quota), '--valid-until', new Date(Date.now() + 120 * DAY).toISOString(),
      '--key', `pkcs11:token=${token.token};object=station-${line}`, '--module', token.module, '--pin-file', pinFile, '--out', pkg, '--root-dir', rootDir]);
    const command = created.stdout.trim();
    assert.match(command, /^hallmark root sign --root-dir \S+ --csr \S+station\.csr --path-len 0 --permit-dn '[^']+' --not-after \S+ --station-manifest \S+station\.json --out \S+station\.pem$/);
    const ceremony = spawnSync('sh', ['-c', command], { encoding: 'utf8', env: { ...process.env, ...env, PATH: `${binDir}:${process.env.PATH}` } });
    assert.equal(ceremony.status, 0, ceremony.stderr);
    const manifest = JSON.parse(readFileSync(join(pkg, 'station.json'), 'utf8')) as { stationId: string; batch: string; deviceSubjectBase: string };
    if (install) ok(['station', 'install', pkg, '--home', home]);
    return { id: manifest.stationId, batch: manifest.batch, base: manifest.deviceSubjectBase };
  };

  const importJson = (journal: string, extra: string[] = []): { code: number; report: ImportReport } => {
    const r = run(['station', 'import', journal, '--home', home, '--json', ...extra]);
    assert.ok(r.code === 0 || r.code === 1, r.stderr);
    return { code: r.code, report: JSON.parse(r.stdout) as ImportReport };
  };

  before(async () => {
    assert.ok(available, 'softhsm2 is required under CI=true (apt-get install softhsm2)');
    dir = mkdtempSync(join(tmpdir(), 'hallmark-station-'));
    token = await createSoftHsmToken('factory-a-token');
    env = { ...token.env, HALLMARK_PASSPHRASE: PASSPHRASE, HALLMARK_DATABASE_URL: '', HALLMARK_PKCS11_PIN: '', HALLMARK_STATION_PIN: '' };
    home = join(dir, 'home');
    rootDir = join(dir, 'root');
    pinFile = join(dir, 'pin');
    writeFileSync(pinFile, token.pin, { mode: 0o600 });
    // `hallmark` on PATH for the printed ceremony command.
    binDir = join(dir, 'bin');
    mkdirSync(binDir);
    writeFileSync(join(binDir, 'hallmark'), `#!/bin/sh\nexec "${process.execPath}" "${BIN}" "$@"\n`);
    chmodSync(join(binDir, 'hallmark'), 0o755);
    ok(['init', '--home', home, '--root-dir', rootDir, '--org', 'Acme Devices']);
    ok(['product', 'create', 'thermostat', '--home', home]);
    ok(['line', 'create', 'factory-a', '--ca', 'issuing-1', '--home', home]);
    ok(['line', 'create', 'factory-b', '--ca', 'issuing-1', '--home', home]);
    writeFileSync(join(dir, 'root.pem'), ok(['ca', 'export', '--home', home]).stdout);
  });

  after(async () => {
    await token?.cleanup();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('a wrong PIN is refused and nothing is stored', () => {
    const wrong = join(dir, 'wrong-pin');
    writeFileSync(wrong, 'not-the-pin');
    const stationsBefore = ok(['station', 'list', '--home', home, '--json']).stdout;
    const batchesBefore = ok(['batch', 'list', '--home', home, '--json']).stdout;
    const pkg = join(dir, 'pkg-wrong-pin');
    fails(['station', 'create', '--home', home, '--line', 'factory-a', '--quota', '5', '--valid-until', new Date(Date.now() + 30 * DAY).toISOString(),
      '--key', `pkcs11:token=${token.token}`, '--module', token.module, '--pin-file', wrong, '--out', pkg], 'BAD_PASSPHRASE');
    assert.equal(ok(['station', 'list', '--home', home, '--json']).stdout, stationsBefore);
    assert.equal(ok(['batch', 'list', '--home', home, '--json']).stdout, batchesBefore);
    assert.ok(!existsSync(pkg), 'no package directory left behind');
  });

  test('create, ceremony, install, factory, import: openssl verifies the devices\' certificates; a second import imports nothing; refusals', () => {
    // HQ: the station for factory A, and one for factory B.
    const pkgA = join(dir, 'pkg-a');
    const a = prepare('factory-a', 5, pkgA);
    const stationPem = join(pkgA, 'station.pem');
    const text = openssl(['x509', '-in', stationPem, '-noout', '-text']);
    assert.match(text, /X509v3 Basic Constraints: critical\s+CA:TRUE, pathlen:0/);
    assert.match(text, /X509v3 Name Constraints: critical\s+Permitted:\s+DirName:\s*O\s*=\s*Acme Devices, OU\s*=\s*thermostat, OU\s*=\s*batch b-[0-9a-f]+/);
    assert.match(openssl(['verify', '-x509_strict', '-CAfile', join(pkgA, 'chain.pem'), stationPem]), /OK/);
    // The root signed off station.json with the certificate: its SHA-256, in Hallmark's own non-critical
    // extension (openssl shows it by OID and still verifies the certificate).
    assert.match(text, /2\.25\.319757526690763988780952622331811686205:/);

    // A package for another line, and another station's certificate, are refused by install.
    const pkgB = join(dir, 'pkg-b');
    const b = prepare('factory-b', 1, pkgB, false);
    const manifestB = readFileSync(join(pkgB, 'station.json'), 'utf8');
    writeFileSync(join(pkgB, 'station.json'), manifestB.replace('"line": "factory-b"', '"line": "factory-a"'));
    const wrongLine = fails(['station', 'install', pkgB, '--home', home], 'STATION_MISMATCH');
    assert.match(wrongLine.stderr, /line "factory-a" \(recorded: "factory-b"\)/);
    writeFileSync(join(pkgB, 'station.json'), manifestB);
    const crossed = fails(['station', 'install', pkgA, '--cert', join(pkgB, 'station.pem'), '--home', home], 'STATION_MISMATCH');
    assert.match(crossed.stderr, new RegExp(`for station ${b.id} \\(line factory-b\\)`));
    ok(['station', 'install', pkgB, '--home', home]);

    // The ceremony refuses to bind a manifest to a certificate that says something else.
    const mismatch = fails(['root', 'sign', '--root-dir', rootDir, '--csr', join(pkgA, 'station.csr'), '--path-len', '0', '--permit-dn', 'O=Acme Devices,OU=thermostat,OU=batch b-000000000000',
      '--not-after', JSON.parse(readFileSync(join(pkgA, 'station.json'), 'utf8')).validUntil, '--station-manifest', join(pkgA, 'station.json'), '--out', join(dir, 'mismatch.pem')], 'BAD_REQUEST');
    assert.match(mismatch.stderr, /--permit-dn must be exactly that/);
    assert.ok(!existsSync(join(dir, 'mismatch.pem')));
    // ... or to bind station B's manifest to station A's request.
    const manifestOfB = JSON.parse(readFileSync(join(pkgB, 'station.json'), 'utf8')) as { deviceSubjectBase: string; validUntil: string };
    const crossedManifest = fails(['root', 'sign', '--root-dir', rootDir, '--csr', join(pkgA, 'station.csr'), '--path-len', '0', '--permit-dn', manifestOfB.deviceSubjectBase,
      '--not-after', manifestOfB.validUntil, '--station-manifest', join(pkgB, 'station.json'), '--out', join(dir, 'mismatch.pem')], 'BAD_REQUEST');
    assert.match(crossedManifest.stderr, /come from different packages/);
    assert.ok(!existsSync(join(dir, 'mismatch.pem')));

    // A factory that raises its quota in station.json is refused at init.
    const manifestA = readFileSync(join(pkgA, 'station.json'), 'utf8');
    assert.match(manifestA, /"quota": 5,/);
    writeFileSync(join(pkgA, 'station.json'), manifestA.replace('"quota": 5,', '"quota": 500,'));
    const raised = fails(station('init', [pkgA, '--dir', join(dir, 'station-a-raised')]), 'STATION_PACKAGE_INVALID');
    assert.match(raised.stderr, /not the manifest the root signed off/);
    assert.ok(!existsSync(join(dir, 'station-a-raised', 'journal.jsonl')), 'nothing set up');
    writeFileSync(join(pkgA, 'station.json'), manifestA);

    // The factory: station init, sign openssl CSRs, export.
    const sdA = join(dir, 'station-a');
    ok(station('init', [pkgA, '--dir', sdA]));
    // ... and after init: the installed copy raised, nothing is signed.
    writeFileSync(join(sdA, 'station.json'), manifestA.replace('"quota": 5,', '"quota": 500,'));
    fails(station('sign', ['--dir', sdA, '--csr-dir', csrs('csrs-a-raised', 1), '--out', join(dir, 'certs-raised')]), 'STATION_PACKAGE_INVALID');
    assert.ok(!existsSync(join(dir, 'certs-raised')) || readdirSync(join(dir, 'certs-raised')).length === 0, 'no certificate');
    writeFileSync(join(sdA, 'station.json'), manifestA);
    const certsA = join(dir, 'certs-a');
    ok(station('sign', ['--dir', sdA, '--csr-dir', csrs('csrs-a', 3), '--out', certsA]));
    const journalA = join(dir, 'journal-a-1.jsonl');
    ok(station('export', ['--dir', sdA, '--out', journalA]));
    const deviceFiles = readdirSync(certsA).filter((f) => f.endsWith('.pem'));
    assert.equal(deviceFiles.length, 3);

    const stationCrl = join(dir, 'station-a.crl.pem');
    ok(['crl', 'show', '--ca', a.id, '--pem', '--out', stationCrl, '--home', home]);
    assert.match(openssl(['crl', '-in', stationCrl, '-noout', '-text']), /No Revoked Certificates/);
    // openssl: every device certificate verifies against the chain (root trusted, the station certificate
    // intermediate, its name constraint applied); the subject comes from the package, not the CSR.
    for (const f of deviceFiles) {
      const leaf = join(certsA, f);
      assert.match(openssl(['verify', '-x509_strict', '-purpose', 'sslclient', '-CAfile', join(dir, 'root.pem'), '-untrusted', stationPem, leaf]), /: OK/);
      // With CRL checking (as Mosquitto does): the empty CRL the station token signed at station create.
      assert.match(openssl(['verify', '-crl_check', '-CRLfile', stationCrl, '-CAfile', join(dir, 'root.pem'), '-untrusted', stationPem, leaf]), /: OK/);
      const subject = openssl(['x509', '-in', leaf, '-noout', '-subject', '-nameopt', 'RFC2253']);
      assert.equal(subject.trim(), `subject=CN=${f.replace(/\.pem$/, '')},OU=batch ${a.batch},OU=thermostat,O=Acme Devices`);
    }

    // HQ: import.
    const first = importJson(journalA);
    assert.equal(first.code, 0, JSON.stringify(first.report.refused));
    assert.deepEqual(first.report.imported.map((i) => i.seq), [1, 2, 3]);
    assert.deepEqual(first.report.quota, { quota: 5, issued: 3, remaining: 2 });
    const udid = deviceFiles[0]!.replace(/\.pem$/, '');
    const shown = JSON.parse(ok(['device', 'show', udid, '--home', home, '--json']).stdout) as { state: string; batch: string; line: string; certificates: unknown[] };
    assert.equal(shown.state, 'provisioned');
    assert.equal(shown.batch, a.batch);
    assert.equal(shown.line, 'factory-a');
    assert.equal(shown.certificates.length, 1);
    ok(['connect', 'check', '--cert', join(certsA, deviceFiles[0]!), '--home', home]);

    // The same journal again: nothing imported, and the command says so.
    const again = run(['station', 'import', journalA, '--home', home]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /0 imported, 3 already imported, 0 refused/);
    assert.match(again.stdout, /Nothing new/);

    // One more device; the journal edited in transit (its new entry's time changed): refused, not imported.
    const certsA2 = join(dir, 'certs-a2');
    ok(station('sign', ['--dir', sdA, '--csr-dir', csrs('csrs-a2', 1), '--out', certsA2]));
    const journalA2 = join(dir, 'journal-a-2.jsonl');
    ok(station('export', ['--dir', sdA, '--out', journalA2]));
    const edited = join(dir, 'journal-a-2-edited.jsonl');
    writeFileSync(edited, readFileSync(journalA2, 'utf8').split('\n').map((l) => (l.startsWith('{"type":"issue","seq":4,') ? l.replace(/"at":"[^"]+"/, '"at":"2020-01-01T00:00:00.000Z"') : l)).join('\n'));
    const e = importJson(edited);
    assert.equal(e.code, 1);
    assert.deepEqual(e.report.imported, []);
    assert.ok(e.report.refused.some((p) => p.seq === 4 && p.kind === 'edited'), JSON.stringify(e.report.refused));
    const newUdid = readdirSync(certsA2)[0]!.replace(/\.pem$/, '');
    fails(['device', 'show', newUdid, '--home', home], 'DEVICE_NOT_FOUND');
    const human = run(['station', 'import', edited, '--home', home]);
    assert.equal(human.code, 1);
    assert.match(human.stdout, /Refused \(not imported\):\n\s+entry 4\s+edited:/);
    // The journal as exported: entry 4 comes in.
    const a2 = importJson(journalA2);
    assert.equal(a2.code, 0);
    assert.deepEqual(a2.report.imported.map((i) => i.seq), [4]);

    // Factory B's quota is 1 (it cannot raise it: station.json is bound to station.pem, above): of three
    // CSRs the station signs one and refuses two; HQ imports the one.
    const sdB = join(dir, 'station-b');
    ok(station('init', [pkgB, '--dir', sdB]));
    const signedB = run(station('sign', ['--dir', sdB, '--csr-dir', csrs('csrs-b', 3), '--out', join(dir, 'certs-b')]));
    assert.equal(signedB.code, 1, signedB.stderr);
    assert.equal((signedB.stderr.match(/\[STATION_QUOTA_EXHAUSTED\]/g) ?? []).length, 2, signedB.stderr);
    assert.equal(readdirSync(join(dir, 'certs-b')).filter((f) => f.endsWith('.pem')).length, 1);
    const journalB = join(dir, 'journal-b.jsonl');
    ok(station('export', ['--dir', sdB, '--out', journalB]));
    // A journal for another station than the one named.
    fails(['station', 'import', journalB, '--station', a.id, '--home', home], 'STATION_MISMATCH');
    // A journal from a station this authority never made.
    const unknown = join(dir, 'journal-unknown.jsonl');
    writeFileSync(unknown, readFileSync(journalB, 'utf8').replace(`"stationId":"${b.id}"`, '"stationId":"station-000000000000"'));
    fails(['station', 'import', unknown, '--home', home], 'STATION_NOT_FOUND');
    const importedB = importJson(journalB, ['--station', b.id]);
    assert.equal(importedB.code, 0, JSON.stringify(importedB.report.refused));
    assert.deepEqual(importedB.report.imported.map((i) => i.seq), [1]);
    const batches = JSON.parse(ok(['batch', 'list', '--home', home, '--json']).stdout) as { id: string; quota: number; issued: number; refused: number }[];
    assert.deepEqual(batches.filter((x) => x.id === b.batch).map((x) => [x.quota, x.issued, x.refused]), [[1, 1, 0]]);

    const list = JSON.parse(ok(['station', 'list', '--home', home, '--json']).stdout) as { id: string; status: string; imported: number; lastSeq: number; line: string }[];
    assert.deepEqual(list.filter((s) => s.id === a.id).map((s) => [s.status, s.line, s.imported, s.lastSeq]), [['active', 'factory-a', 4, 4]]);
    assert.match(ok(['station', 'list', '--home', home]).stdout, new RegExp(`${a.id}\\s+active\\s+factory-a`));
    // The station CA is on record with no key online.
    const cas = JSON.parse(ok(['ca', 'list', '--home', home, '--json']).stdout) as { name: string; status: string; pathLen: number | null }[];
    assert.deepEqual(cas.filter((c) => c.name === a.id).map((c) => [c.status, c.pathLen]), [['active', 0]]);

    // Revocation: the registry refuses the device at once (no CRL can be signed for the station CA online).
    ok(['revoke', '--device', udid, '--reason', 'keyCompromise', '--home', home]);
    const refused = run(['connect', 'check', '--cert', join(certsA, deviceFiles[0]!), '--home', home, '--json']);
    assert.equal(refused.code, 1);
    assert.match((JSON.parse(refused.stdout) as { code: string }).code, /REVOKED/);
    ok(['audit', 'verify', '--home', home]);
  });
});
