// The line compromise drill (docs/operations.md): line A's CA is compromised. Its certificates are revoked,
// line A2 is created with a new CA, line A's devices are moved to it, and their next enrolment — with
// their still-valid hardware identity, since their operational certificates are revoked — lands on A2.
// Operator steps through the `hallmark` command; device steps through curl and openssl; checks by openssl.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { createLogger } from '../../src/log.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';

const run = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

describe('line compromise drill', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let env: NodeJS.ProcessEnv;
  const hallmark = async (...args: string[]): Promise<string> => (await run(process.execPath, [BIN, ...args, '--home', t.home], { env, encoding: 'utf8' })).stdout;
  const sh = async (cmd: string, args: string[]): Promise<string> => (await run(cmd, args, { cwd: t.dir, encoding: 'utf8' })).stdout;

  /** The offline ceremony for a line's own CA: line create -> root sign -> ca install. */
  async function lineWithOwnCa(name: string): Promise<void> {
    await hallmark('line', 'create', name);
    const csr = join(t.home, 'requests', `line-${name}.csr`);
    const cert = join(t.dir, `line-${name}.pem`);
    await run(process.execPath, [BIN, 'root', 'sign', '--root-dir', t.rootDir, '--csr', csr, '--out', cert], { env, encoding: 'utf8' });
    await hallmark('ca', 'install', '--cert', cert);
  }

  /** A device: a key made by openssl, registered in the batch. */
  async function device(name: string, batch: string): Promise<{ key: string; csrB64: string }> {
    const key = join(t.dir, `${name}.key`);
    await sh('openssl', ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', key]);
    await sh('openssl', ['pkey', '-in', key, '-pubout', '-out', join(t.dir, `${name}.pub.pem`)]);
    await hallmark('device', 'register', '--batch', batch, '--public-key', join(t.dir, `${name}.pub.pem`));
    const csr = join(t.dir, `${name}.csr`);
    await sh('openssl', ['req', '-new', '-key', key, '-subj', `/CN=${name}`, '-outform', 'DER', '-out', csr]);
    const csrB64 = join(t.dir, `${name}.csr.b64`);
    writeFileSync(csrB64, readFileSync(csr).toString('base64'));
    return { key, csrB64 };
  }

  /** EST with curl; returns the HTTP status and, on 200, the certificate as PEM. */
  async function est(op: 'simpleenroll' | 'simplereenroll', d: { key: string; csrB64: string }, cert?: string): Promise<{ status: number; pem?: string }> {
    const out = join(t.dir, `reply-${Math.random().toString(16).slice(2)}`);
    const status = (await sh('curl', ['--silent', '--cacert', t.rootPem, ...(cert ? ['--cert', cert, '--key', d.key] : []), '-H', 'Content-Type: application/pkcs10',
      '--data-binary', `@${d.csrB64}`, '-o', out, '-w', '%{http_code}', `${servers.httpsUrl}/.well-known/est/${op}`])).trim();
    if (status !== '200') return { status: Number(status) };
    await sh('openssl', ['base64', '-d', '-in', out, '-out', `${out}.p7`]);
    await sh('openssl', ['pkcs7', '-inform', 'DER', '-in', `${out}.p7`, '-print_certs', '-out', `${out}.pem`]);
    return { status: 200, pem: `${out}.pem` };
  }

  const issuerOf = async (pem: string) => (await sh('openssl', ['x509', '-in', pem, '-noout', '-issuer'])).trim();

  before(async () => {
    t = await createTestAuthority();
    env = { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' };
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream), revocationPollMs: 100 });
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  test('revoke line A, create A2, move the devices: their next enrolment lands on A2', async () => {
    await hallmark('product', 'create', 'meter');
    await lineWithOwnCa('A');
    const batch = (await hallmark('batch', 'create', '--product', 'meter', '--line', 'A', '--quota', '10')).trim();
    const devices = [await device('meter-1', batch), await device('meter-2', batch)];

    // Before: the devices enrol with their registered hardware keys; line A's CA issues.
    const before: string[] = [];
    for (const d of devices) {
      const r = await est('simpleenroll', d);
      assert.equal(r.status, 200);
      assert.match(await issuerOf(r.pem!), /line-A/);
      before.push(r.pem!);
    }
    const chainA = join(t.dir, 'chain-A.pem');
    writeFileSync(chainA, await hallmark('ca', 'export', '--name', 'line-A', '--chain'));

    // Compromise: every certificate line A's CA issued is revoked.
    const revoked = JSON.parse(await hallmark('revoke', '--ca', 'line-A', '--reason', 'cACompromise', '--json')) as { revoked: number };
    assert.equal(revoked.revoked, 2);
    // The CA's CRL says so, and openssl refuses the old certificates with it.
    const crl = join(t.dir, 'line-A.crl');
    await sh('curl', ['--silent', '--fail', '-o', crl, `${servers.httpUrl}/crl/line-A.crl`]);
    await sh('openssl', ['crl', '-inform', 'DER', '-in', crl, '-out', `${crl}.pem`]);
    const check = await run('openssl', ['verify', '-crl_check', '-CRLfile', `${crl}.pem`, '-CAfile', t.rootPem, '-untrusted', chainA, before[0]!], { encoding: 'utf8' }).catch((e: { stdout: string; stderr: string }) => e);
    assert.match(`${check.stdout}${check.stderr}`, /certificate revoked/);
    // The old certificate no longer renews anything.
    assert.equal((await est('simplereenroll', devices[0]!, before[0])).status, 403);

    // Recovery: line A2 with a new CA; line A's batches and devices move to it.
    await lineWithOwnCa('A2');
    assert.match(await hallmark('line', 'move', '--from', 'A', '--to', 'A2'), /Moved 1 batch\(es\) and 2 device\(s\)/);

    // The devices' next enrolment, with their hardware identity, is issued by A2.
    const chainA2 = join(t.dir, 'chain-A2.pem');
    writeFileSync(chainA2, await hallmark('ca', 'export', '--name', 'line-A2', '--chain'));
    for (const d of devices) {
      const r = await est('simpleenroll', d);
      assert.equal(r.status, 200);
      assert.match(await issuerOf(r.pem!), /line-A2/);
      assert.match(await sh('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', chainA2, r.pem!]), /OK/);
    }
    const audit = await hallmark('audit', 'list', '--limit', '200');
    assert.match(audit, /line\.move/);
    assert.match(audit, /revocation\.bulk/);
  });
});
