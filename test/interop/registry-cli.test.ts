// The registry through the `hallmark` command: products, lines, batches, devices with keys made by
// openssl, device issuance gated by the registry (subject from the registry, quota, state), audit,
// paging, ownership, vendors and birth certificates. Certificates are checked with openssl.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');
const PASSPHRASE = 'registry cli test passphrase';
const VECTORS = process.env.HALLMARK_TEST_VECTORS || resolve(import.meta.dirname, '..', '..', '..', 'test', 'vectors');
const MCHP_DIR = join(VECTORS, 'microchip', 'pytrustplatform');

interface Result { code: number; stdout: string; stderr: string }

const ENV = { ...process.env, HALLMARK_PASSPHRASE: PASSPHRASE, HALLMARK_DATABASE_URL: '' };

function hallmark(args: string[], env: Record<string, string | undefined> = {}): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...ENV, ...env }, timeout: 60000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function ok(args: string[], env: Record<string, string | undefined> = {}): Result {
  const r = hallmark(args, env);
  assert.equal(r.code, 0, `hallmark ${args.join(' ')} failed: ${r.stderr}`);
  return r;
}

/** A refusal: exit 1, one line on stderr naming the code. */
function refused(args: string[], code: string | RegExp): Result {
  const r = hallmark(args);
  assert.equal(r.code, 1, `hallmark ${args.join(' ')} should exit 1: ${r.stdout}${r.stderr}`);
  assert.match(r.stderr, typeof code === 'string' ? new RegExp(`\\[${code}\\]`) : code, `hallmark ${args.join(' ')}`);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
  return r;
}

const openssl = (args: string[]): string => execFileSync('openssl', args, { encoding: 'utf8' });

interface Device { readonly key: string; readonly pub: string; readonly udid: string }

describe('hallmark registry CLI', () => {
  let dir: string;
  let home: string;
  let rootDir: string;
  let batch: string;
  const devices: Device[] = [];
  const h = (...args: string[]): string[] => [...args, '--home', home];

  /** A device key made by openssl; the UDID expected is the SHA-256 of the SPKI DER, computed from openssl's DER. */
  function opensslDevice(name: string): Device {
    const key = join(dir, `${name}.key`);
    const pub = join(dir, `${name}.pub.pem`);
    openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', key]);
    openssl(['pkey', '-in', key, '-pubout', '-out', pub]);
    const der = execFileSync('openssl', ['pkey', '-in', key, '-pubout', '-outform', 'DER']);
    return { key, pub, udid: createHash('sha256').update(der).digest('hex') };
  }

  function csr(device: Device, subject: string, name: string): string {
    const file = join(dir, `${name}.csr`);
    openssl(['req', '-new', '-key', device.key, '-subj', subject, '-addext', 'subjectAltName=DNS:evil.example,URI:urn:evil', '-addext', 'basicConstraints=critical,CA:TRUE', '-out', file]);
    return file;
  }

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'hallmark-registry-cli-'));
    home = join(dir, 'home');
    rootDir = join(dir, 'offline-root');
    ok(['init', '--home', home, '--root-dir', rootDir, '--org', 'Acme Devices']);
    writeFileSync(join(dir, 'root.pem'), ok(h('ca', 'export')).stdout);
    writeFileSync(join(dir, 'intermediate.pem'), ok(h('ca', 'export', '--name', 'issuing-1')).stdout);
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  test('every registry subcommand has --help', async () => {
    const overview = ok(['--help']).stdout;
    const listed = [...overview.matchAll(/^ {2}((?:product|line|batch|device|vendor|manifest) [a-z]+) {2,}/gm)].map((m) => m[1]!);
    const expected = ['product create', 'product list', 'line create', 'line list', 'batch create', 'batch list', 'device register', 'device show', 'device list',
      'device transfer', 'device suspend', 'device resume', 'device decommission', 'vendor add', 'vendor list'];
    for (const name of expected) assert.ok(listed.includes(name), `${name} is in hallmark --help`);
    await Promise.all(listed.map(async (name) => {
      const { stdout } = await execFileAsync(process.execPath, [BIN, ...name.split(' '), '--help'], { env: ENV });
      assert.match(stdout, new RegExp(`Usage: hallmark ${name}`), name);
    }));
  });

  test('product create, line create --ca issuing-1, batch create (prints the batch id); bad input refused', () => {
    ok(h('product', 'create', 'meter', '--validity', '90d'));
    ok(h('line', 'create', 'line-a', '--ca', 'issuing-1'));
    const out = ok(h('batch', 'create', '--product', 'meter', '--line', 'line-a', '--quota', '2')).stdout;
    assert.match(out, /^b-[0-9a-f]{12}\n$/, 'the batch id alone, for scripts');
    batch = out.trim();
    assert.deepEqual(JSON.parse(ok(h('product', 'list', '--json')).stdout).map((p: { name: string; validityDays: number }) => [p.name, p.validityDays]), [['meter', 90]]);
    assert.deepEqual(JSON.parse(ok(h('line', 'list', '--json')).stdout).map((l: { name: string; ca: string }) => [l.name, l.ca]), [['line-a', 'issuing-1']]);
    const batches = JSON.parse(ok(h('batch', 'list', '--json')).stdout) as Array<{ id: string; quota: number; product: string; line: string }>;
    assert.deepEqual(batches.map((b) => [b.id, b.product, b.line, b.quota]), [[batch, 'meter', 'line-a', 2]]);
    refused(h('product', 'create', 'meter'), 'ALREADY_EXISTS');
    refused(h('batch', 'create', '--product', 'nope', '--line', 'line-a', '--quota', '2'), 'PRODUCT_NOT_FOUND');
    refused(h('batch', 'create', '--product', 'meter', '--line', 'line-a', '--quota', '2', '--expires', '2001-01-01'), 'BAD_REQUEST');
    assert.equal(hallmark(h('batch', 'create', '--product', 'meter', '--line', 'line-a', '--quota', 'many')).code, 2, 'a usage error');
    assert.equal(JSON.parse(ok(h('batch', 'list', '--json')).stdout).length, 1, 'nothing created by the refusals');
  });

  test('device register with openssl-generated keys: the UDID is the SHA-256 of the SPKI DER; a clone is refused', () => {
    for (let i = 1; i <= 3; i++) {
      const d = opensslDevice(`dev${i}`);
      const out = ok(h('device', 'register', '--batch', batch, '--public-key', d.pub, '--serial', `SN-000${i}`)).stdout;
      assert.equal(out.trim(), `Registered ${d.udid} in batch ${batch} (registered)`);
      devices.push(d);
    }
    // A DER public key file is the same key.
    const der = join(dir, 'dev1.pub.der');
    execFileSync('openssl', ['pkey', '-in', devices[0]!.key, '-pubout', '-outform', 'DER', '-out', der]);
    const other = ok(h('batch', 'create', '--product', 'meter', '--line', 'line-a', '--quota', '5')).stdout.trim();
    refused(h('device', 'register', '--batch', other, '--public-key', der), 'CLONE_DETECTED');
    refused(h('device', 'register', '--batch', batch, '--public-key', devices[1]!.pub, '--udid', 'c0ffee'), 'CLONE_DETECTED');
    const clones = ok(h('audit', 'list', '--action', 'device.clone_refused', '--json')).stdout.trim().split('\n').map((l) => JSON.parse(l) as { target: string; details: { batch: string; existingBatch: string } });
    assert.deepEqual(clones.map((c) => [c.target, c.details.batch, c.details.existingBatch]), [[devices[0]!.udid, other, batch], ['c0ffee', batch, batch]]);
    refused(h('device', 'register', '--batch', 'b-000000000000', '--public-key', opensslDevice('stray').pub), 'BATCH_NOT_FOUND');
    assert.equal(JSON.parse(ok(h('batch', 'list', '--json')).stdout).find((b: { id: string }) => b.id === batch).registered, 3);
  });

  test('issue --device with a CSR whose subject is /CN=evil: the certificate names the UDID and serial; openssl verify accepts it', () => {
    const d = devices[0]!;
    const certFile = join(dir, 'dev1.pem');
    const r = ok(h('issue', '--device', d.udid, '--csr', csr(d, '/CN=evil/O=Evil Corp', 'dev1'), '--out', certFile));
    assert.match(r.stderr, new RegExp(`CN=${d.udid}`));
    const subject = openssl(['x509', '-in', certFile, '-noout', '-subject', '-nameopt', 'RFC2253']);
    assert.equal(subject.trim(), `subject=O=Acme Devices,OU=meter,CN=${d.udid},serialNumber=SN-0001`);
    const text = openssl(['x509', '-in', certFile, '-noout', '-text']);
    assert.doesNotMatch(text, /evil/i);
    assert.match(text, /CA:FALSE/);
    assert.match(text, new RegExp(`URI:urn:hallmark:udid:${d.udid}`));
    assert.match(openssl(['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'intermediate.pem'), certFile]), /dev1\.pem: OK/);
    // The certificate carries the registered key.
    assert.equal(openssl(['x509', '-in', certFile, '-noout', '-pubkey']), readFileSync(d.pub, 'utf8'));
  });

  test('a CSR with another key -> KEY_MISMATCH; over quota the issue exits 1 with QUOTA_EXCEEDED, shown by audit list, batch list and line list', () => {
    refused(h('issue', '--device', devices[1]!.udid, '--csr', csr(opensslDevice('intruder'), '/CN=x', 'intruder')), 'KEY_MISMATCH');
    ok(h('issue', '--device', devices[1]!.udid, '--csr', csr(devices[1]!, '/CN=dev2', 'dev2'), '--out', join(dir, 'dev2.pem')));
    const out = join(dir, 'dev3.pem');
    const r = refused(h('issue', '--device', devices[2]!.udid, '--csr', csr(devices[2]!, '/CN=dev3', 'dev3'), '--out', out), 'QUOTA_EXCEEDED');
    assert.match(r.stderr, new RegExp(batch));
    assert.ok(!existsSync(out), 'nothing written');
    const audit = ok(h('audit', 'list', '--action', 'issuance.quota_exceeded')).stdout.trim().split('\n');
    assert.equal(audit.length, 1);
    assert.match(audit[0]!, /\tissuance\.quota_exceeded\t/);
    assert.ok(audit[0]!.includes(devices[2]!.udid), audit[0]);
    assert.ok(audit[0]!.includes(batch));
    assert.match(ok(h('audit', 'list', '--action', 'issuance.refused')).stdout, /KEY_MISMATCH/);
    const b = JSON.parse(ok(h('batch', 'list', '--json')).stdout).find((x: { id: string }) => x.id === batch);
    assert.deepEqual([b.quota, b.issued, b.refused], [2, 2, 1]);
    assert.equal(JSON.parse(ok(h('line', 'list', '--json')).stdout).find((l: { name: string }) => l.name === 'line-a').refusedIssuances, 1);
    // Renewal of a provisioned device takes no quota.
    ok(h('issue', '--device', devices[0]!.udid, '--csr', join(dir, 'dev1.csr'), '--out', join(dir, 'dev1-renewed.pem')));
  });

  test('device list --json pages with --limit and --after; filters; device show', () => {
    const expected = devices.map((d) => d.udid).sort();
    const first = JSON.parse(ok(h('device', 'list', '--batch', batch, '--limit', '2', '--json')).stdout) as { items: Array<{ udid: string }>; next: string | null };
    assert.equal(first.items.length, 2);
    assert.ok(first.next);
    const second = JSON.parse(ok(h('device', 'list', '--batch', batch, '--limit', '2', '--after', first.next!, '--json')).stdout) as typeof first;
    assert.equal(second.next, null);
    assert.deepEqual([...first.items, ...second.items].map((d) => d.udid), expected, 'every device once, in order');
    assert.match(ok(h('device', 'list', '--batch', batch, '--limit', '2')).stdout, /\(more: --after [0-9a-f]+\)/);
    const provisioned = JSON.parse(ok(h('device', 'list', '--state', 'provisioned', '--json')).stdout) as typeof first;
    assert.deepEqual(provisioned.items.map((d) => d.udid), [devices[0]!.udid, devices[1]!.udid].sort());
    refused(h('device', 'list', '--state', 'sleeping'), 'BAD_REQUEST');

    const shown = JSON.parse(ok(h('device', 'show', devices[0]!.udid, '--json')).stdout) as { udid: string; state: string; serialNumber: string; batch: string; product: string; line: string; tenant: string; certificates: Array<{ status: string }> };
    assert.deepEqual([shown.udid, shown.state, shown.serialNumber, shown.batch, shown.product, shown.line, shown.tenant], [devices[0]!.udid, 'provisioned', 'SN-0001', batch, 'meter', 'line-a', 'default']);
    assert.deepEqual(shown.certificates.map((c) => c.status), ['valid', 'valid']);
    const text = ok(h('device', 'show', devices[2]!.udid)).stdout;
    assert.match(text, /state\s+registered/);
    assert.match(text, /certificates\s+-/);
    refused(h('device', 'show', 'abcdef'), 'DEVICE_NOT_FOUND');
  });

  test('device transfer, suspend and resume: a suspended device gets no certificate until resumed', () => {
    const d = devices[1]!;
    assert.match(ok(h('device', 'transfer', d.udid, '--to', 'globex')).stdout, /now belongs to globex/);
    assert.deepEqual((JSON.parse(ok(h('device', 'list', '--tenant', 'globex', '--json')).stdout) as { items: Array<{ udid: string }> }).items.map((x) => x.udid), [d.udid]);
    const transfer = JSON.parse(ok(h('audit', 'list', '--action', 'device.transfer', '--json')).stdout.trim()) as { target: string; details: { from: string; to: string } };
    assert.deepEqual([transfer.target, transfer.details.from, transfer.details.to], [d.udid, 'default', 'globex']);
    assert.match(ok(h('device', 'suspend', d.udid)).stdout, /is suspended/);
    refused(h('issue', '--device', d.udid, '--csr', join(dir, 'dev2.csr')), 'DEVICE_NOT_ELIGIBLE');
    refused(h('device', 'suspend', d.udid), 'ILLEGAL_TRANSITION');
    assert.match(ok(h('device', 'resume', d.udid)).stdout, /is active/);
    ok(h('issue', '--device', d.udid, '--csr', join(dir, 'dev2.csr'), '--out', join(dir, 'dev2-again.pem')));
  });

  test('decommission, then issue -> DEVICE_NOT_ELIGIBLE; its certificates are revoked', () => {
    const d = devices[0]!;
    assert.match(ok(h('device', 'decommission', d.udid)).stdout, /is decommissioned/);
    refused(h('issue', '--device', d.udid, '--csr', join(dir, 'dev1.csr')), 'DEVICE_NOT_ELIGIBLE');
    const shown = JSON.parse(ok(h('device', 'show', d.udid, '--json')).stdout) as { state: string; certificates: Array<{ status: string }> };
    assert.equal(shown.state, 'decommissioned');
    assert.deepEqual(shown.certificates.map((c) => c.status), ['revoked', 'revoked']);
    refused(h('device', 'resume', d.udid), 'ILLEGAL_TRANSITION');
    const refusals = ok(h('audit', 'list', '--action', 'issuance.refused')).stdout;
    assert.ok(refusals.includes(d.udid) && refusals.includes('DEVICE_NOT_ELIGIBLE'));
  });

  test('issue --device refuses --subject (and every other option the registry decides), changing nothing', () => {
    const before = ok(h('audit', 'verify')).stdout;
    const d = devices[1]!;
    const base = ['issue', '--device', d.udid, '--csr', join(dir, 'dev2.csr')];
    for (const extra of [['--subject', 'CN=mine'], ['--dns', 'evil.example'], ['--ca', 'issuing-1'], ['--days', '3650']]) {
      const r = hallmark(h(...base, ...extra));
      assert.notEqual(r.code, 0, extra.join(' '));
      assert.match(r.stderr, new RegExp(`${extra[0]} cannot be used with --device`), r.stderr);
    }
    assert.equal(ok(h('audit', 'verify')).stdout, before, 'no audit entry: nothing was issued');
  });

  test('line create without --ca waits for the offline ceremony: CA_NOT_ACTIVE until ca install', () => {
    const created = ok(h('line', 'create', 'line-p'));
    const csrPath = /--csr (\S+)/.exec(created.stderr)?.[1];
    assert.ok(csrPath && existsSync(csrPath), created.stderr);
    const lines = JSON.parse(ok(h('line', 'list', '--json')).stdout) as Array<{ name: string; ca: string; caStatus: string }>;
    assert.deepEqual(lines.find((l) => l.name === 'line-p'), { ...lines.find((l) => l.name === 'line-p'), ca: 'line-line-p', caStatus: 'pending' });
    const b = ok(h('batch', 'create', '--product', 'meter', '--line', 'line-p', '--quota', '1')).stdout.trim();
    const d = opensslDevice('devp');
    ok(h('device', 'register', '--batch', b, '--public-key', d.pub));
    const req = csr(d, '/CN=p', 'devp');
    refused(h('issue', '--device', d.udid, '--csr', req), 'CA_NOT_ACTIVE');
    ok(['root', 'sign', '--root-dir', rootDir, '--csr', csrPath, '--path-len', '0', '--out', join(dir, 'line-p.pem')]);
    ok(h('ca', 'install', '--cert', join(dir, 'line-p.pem')));
    const certFile = join(dir, 'devp.pem');
    ok(h('issue', '--device', d.udid, '--csr', req, '--out', certFile));
    assert.match(openssl(['verify', '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'line-p.pem'), certFile]), /devp\.pem: OK/);
  });

  test('vendor add and device register --birth-cert with a real Microchip ATECC608 certificate', { skip: existsSync(MCHP_DIR) || process.env.CI === 'true' ? false : `vendor vectors not found at ${VECTORS}` }, () => {
    const trust = join(dir, 'microchip-cas.pem');
    writeFileSync(trust, readFileSync(join(MCHP_DIR, 'Crypto_Authentication_Root_CA_002.crt'), 'utf8') + readFileSync(join(MCHP_DIR, 'Crypto_Authentication_Signer_2C00.cer'), 'utf8'));
    assert.match(ok(h('vendor', 'add', 'microchip', '--ca', trust)).stdout, /2 CA certificate\(s\) added/);
    refused(h('vendor', 'add', 'microchip', '--ca', join(MCHP_DIR, 'sn01230390B3D1450C01.cer')), 'BAD_REQUEST');
    const vendors = JSON.parse(ok(h('vendor', 'list', '--json')).stdout) as Array<{ vendor: string; subject: string }>;
    assert.deepEqual(vendors.map((v) => v.vendor), ['microchip', 'microchip']);
    const chip = join(MCHP_DIR, 'sn01230390B3D1450C01.cer');
    const b = ok(h('batch', 'create', '--product', 'meter', '--line', 'line-a', '--quota', '10')).stdout.trim();
    // The certificate of another chip is no birth certificate for this key.
    refused(h('device', 'register', '--batch', b, '--public-key', opensslDevice('unborn').pub, '--birth-cert', chip), 'BIRTH_CERT_INVALID');
    // Signed by Signer 2C10, which is not trusted here.
    const other = join(MCHP_DIR, 'sn0123D26E26E688C901.cer');
    refused(h('device', 'register', '--batch', b, '--public-key', other, '--birth-cert', other), 'BIRTH_CERT_INVALID');
    const device = JSON.parse(ok(h('device', 'register', '--batch', b, '--public-key', chip, '--birth-cert', chip, '--serial', '01230390B3D1450C01', '--json')).stdout) as { udid: string; hasBirthCertificate: boolean };
    assert.equal(device.hasBirthCertificate, true);
    const spki = execFileSync('openssl', ['x509', '-in', chip, '-noout', '-pubkey']);
    const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'DER'], { input: spki });
    assert.equal(device.udid, createHash('sha256').update(der).digest('hex'));
    assert.equal((JSON.parse(ok(h('device', 'list', '--batch', b, '--json')).stdout) as { items: unknown[] }).items.length, 1);
  });

  test('the audit chain verifies after all of it', () => {
    assert.match(ok(h('audit', 'verify')).stdout, /^ok, \d+ entries$/m);
  });
});
