// The trivial task of benchmarks/piscina_throughput.js: return the argument (echo).
'use strict';

module.exports = (x) => x;
