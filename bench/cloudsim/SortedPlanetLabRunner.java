// Runs CloudSim's own PlanetLab power experiment (RunnerAbstract with the stock
// allocation and selection policies) with one change of input: the trace files are
// taken in name order, as tern takes them, instead of in the file system's listing
// order, so that both simulators give each trace the same VM type.
//
// Usage: java SortedPlanetLabRunner DATA_DIR DAY POLICY [SELECTION] [PARAMETER]
// (POLICY as CloudSim's runner names them: thr, dvfs, ...)

import java.io.File;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Calendar;
import java.util.List;

import org.cloudbus.cloudsim.Cloudlet;
import org.cloudbus.cloudsim.UtilizationModelNull;
import org.cloudbus.cloudsim.UtilizationModelPlanetLabInMemory;
import org.cloudbus.cloudsim.core.CloudSim;
import org.cloudbus.cloudsim.examples.power.Constants;
import org.cloudbus.cloudsim.examples.power.Helper;
import org.cloudbus.cloudsim.examples.power.RunnerAbstract;
import org.cloudbus.cloudsim.examples.power.planetlab.PlanetLabConstants;

public class SortedPlanetLabRunner extends RunnerAbstract {
    public SortedPlanetLabRunner(String dataDir, String day, String policy, String selection, String parameter) {
        super(false, false, dataDir, "output", day, policy, selection, parameter);
    }

    @Override
    protected void init(String inputFolder) {
        try {
            CloudSim.init(1, Calendar.getInstance(), false);
            broker = Helper.createBroker();
            File[] files = new File(inputFolder).listFiles();
            if (files == null) {
                throw new IllegalArgumentException(inputFolder + " is not a folder");
            }
            Arrays.sort(files);
            List<Cloudlet> cloudlets = new ArrayList<>();
            for (int i = 0; i < files.length; i++) {
                Cloudlet c = new Cloudlet(i, Constants.CLOUDLET_LENGTH, Constants.CLOUDLET_PES, 300, 300,
                        new UtilizationModelPlanetLabInMemory(files[i].getAbsolutePath(), Constants.SCHEDULING_INTERVAL),
                        new UtilizationModelNull(), new UtilizationModelNull());
                c.setUserId(broker.getId());
                c.setVmId(i);
                cloudlets.add(c);
            }
            cloudletList = cloudlets;
            vmList = Helper.createVmList(broker.getId(), cloudletList.size());
            hostList = Helper.createHostList(PlanetLabConstants.NUMBER_OF_HOSTS);
        } catch (Exception e) {
            throw new RuntimeException(e);
        }
    }

    public static void main(String[] args) {
        if (args.length < 3) {
            System.err.println("usage: SortedPlanetLabRunner DATA_DIR DAY POLICY [SELECTION] [PARAMETER]");
            System.exit(2);
        }
        new SortedPlanetLabRunner(args[0], args[1], args[2],
                args.length > 3 ? args[3] : "", args.length > 4 ? args[4] : "");
    }
}
