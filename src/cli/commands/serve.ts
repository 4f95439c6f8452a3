import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Authority } from '../../authority/authority.js';
import { HOME_FILES, defaultRootDir, isInitialised, loadHomeConfig, resolveHome } from '../../authority/home.js';
import { initAuthority } from '../../authority/init.js';
import { createLogger } from '../../log.js';
import { REQUEST_TIMEOUT_MS, startServers } from '../../server/servers.js';
import { DEFAULT_EST_PER_CLIENT_PER_MINUTE } from '../../protocols/est/routes.js';
import { HallmarkError } from '../../errors.js';
import { actor, flag, intOption, readPassphrase, str, type Command } from '../io.js';
import { keepMosquittoInStep } from '../../broker/mosquitto.js';

export const serveCommand: Command = {
  name: 'serve',
  summary: 'serve the authority: EST enrolment and the admin API over HTTPS, public data over plain HTTP',
  usage: `Usage: hallmark serve [--home DIR] [--port 8443] [--http-port 8080] [--host 127.0.0.1] [--passphrase-file FILE] [--dev]
                     [--est-per-client N] [--ocsp-on-demand-per-client N] [--request-timeout SECONDS] [--broker-dir DIR]

HTTPS (TLS 1.2 and 1.3, client certificates requested but optional) serves EST enrolment under
/.well-known/est (RFC 7030) and the admin API under /api/v1 (bearer tokens; OpenAPI at
/api/v1/openapi.json). Plain HTTP serves only public data: CA certificates under /ca/. Both answer
GET /healthz. The root key is never needed.

--est-per-client N       EST requests per minute per client address (default ${DEFAULT_EST_PER_CLIENT_PER_MINUTE}; 0: no limit,
                         e.g. behind a load balancer that hides client addresses)
--ocsp-on-demand-per-client N
                         OCSP responses signed on demand (nonce, several CertIDs, first ask of a serial) per minute per
                         client address (default 6000; 0: no limit). Over it, nonces are ignored (the cached answer is
                         served) and what needs a new signature gets tryLater; cached answers are never refused.
--request-timeout S      a request must arrive whole within S seconds (default ${REQUEST_TIMEOUT_MS / 1000}); slow clients are cut off
--broker-dir DIR         keep a "hallmark broker mosquitto" configuration in step: CRL and ACL (SIGHUP), and revoked,
                         suspended or decommissioned devices disconnected at once (docs/broker.md)

--dev: when the home is not initialised, create a DEVELOPMENT authority there first (org
"Hallmark Development"; passphrase from HALLMARK_PASSPHRASE, or generated and stored in
<home>/${HOME_FILES.devPassphrase}). Never use a development authority in production.`,
  options: { port: { type: 'string' }, 'http-port': { type: 'string' }, host: { type: 'string' }, 'passphrase-file': { type: 'string' }, dev: { type: 'boolean' }, 'est-per-client': { type: 'string' }, 'ocsp-on-demand-per-client': { type: 'string' }, 'request-timeout': { type: 'string' }, 'broker-dir': { type: 'string' } },
  async run(args) {
    const home = resolveHome(str(args, 'home'));
    const estPerClientPerMinute = intOption(args, 'est-per-client');
    const ocspOnDemandPerMinute = intOption(args, 'ocsp-on-demand-per-client');
    if (ocspOnDemandPerMinute !== undefined && ocspOnDemandPerMinute < 0) throw new HallmarkError('BAD_REQUEST', '--ocsp-on-demand-per-client must be 0 or more');
    const requestTimeout = intOption(args, 'request-timeout');
    if (requestTimeout !== undefined && (requestTimeout < 1 || requestTimeout > 3600)) throw new HallmarkError('BAD_REQUEST', '--request-timeout must be 1..3600 seconds');
    if (estPerClientPerMinute !== undefined && estPerClientPerMinute < 0) throw new HallmarkError('BAD_REQUEST', '--est-per-client must be 0 or more');
    const log = createLogger();
    const devPassFile = join(home, HOME_FILES.devPassphrase);
    let passphrase: string;
    if (flag(args, 'dev') && !isInitialised(home)) {
      passphrase = process.env.HALLMARK_PASSPHRASE || randomBytes(24).toString('base64url');
      log.warn({ home }, '*** CREATING A DEVELOPMENT AUTHORITY — FOR DEVELOPMENT ONLY, NOT FOR PRODUCTION ***');
      await initAuthority({ home, rootDir: defaultRootDir(home), org: 'Hallmark Development', passphrase, keyBackend: 'file', development: true, publicUrl: `http://localhost:${intOption(args, 'http-port') ?? 8080}`, actor: actor() });
      if (!process.env.HALLMARK_PASSPHRASE) writeFileSync(devPassFile, passphrase + '\n', { mode: 0o600 });
    } else if (flag(args, 'dev') && !process.env.HALLMARK_PASSPHRASE && !str(args, 'passphrase-file') && existsSync(devPassFile)) {
      passphrase = readFileSync(devPassFile, 'utf8').trim();
    } else {
      await loadHomeConfig(home);
      passphrase = await readPassphrase(args);
    }
    const authority = await Authority.open(home, passphrase);
    if (authority.config.development) {
      log.warn({ home }, '*** DEVELOPMENT AUTHORITY: its key store passphrase may sit beside the keys. Do not issue production identities from it. ***');
    }
    const servers = await startServers(authority, {
      host: str(args, 'host') ?? '127.0.0.1',
      httpsPort: intOption(args, 'port') ?? 8443,
      httpPort: intOption(args, 'http-port') ?? 8080,
      logger: log,
      estPerClientPerMinute,
      ocspOnDemandPerMinute,
      requestTimeoutMs: requestTimeout === undefined ? undefined : requestTimeout * 1000,
    });
    log.info({ https: servers.httpsUrl, http: servers.httpUrl, store: authority.store.describe() }, 'hallmark serving');
    const stopBroker = str(args, 'broker-dir') ? keepMosquittoInStep(authority, str(args, 'broker-dir')!, { onError: (err) => log.warn({ err }, 'broker sync failed') }) : undefined;
    await new Promise<void>((resolve) => {
      const stop = () => resolve();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
    });
    log.info('shutting down');
    stopBroker?.();
    await servers.close();
    await authority.close();
    return 0;
  },
};
